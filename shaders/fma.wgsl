// FMA-rate probe: four independent chains of vec4<f32> fused multiply-adds per invocation, kept in registers.
// FLOPs per invocation = ITERATIONS × 4 chains × 4 lanes × 2. The result is stored so nothing is optimised away.

const ITERATIONS: u32 = 256u;

@group(0) @binding(0) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let seed = f32(gid.x) * 1e-9;
    var a = vec4<f32>(seed, 0.1, 0.2, 0.3);
    var b = vec4<f32>(0.4, seed, 0.5, 0.6);
    var c = vec4<f32>(0.7, 0.8, seed, 0.9);
    var d = vec4<f32>(1.0, 1.1, 1.2, seed);
    let m = vec4<f32>(0.999, 0.998, 0.997, 0.996);
    let k = vec4<f32>(1e-4, 2e-4, 3e-4, 4e-4);
    for (var i = 0u; i < ITERATIONS; i = i + 1u) {
        a = fma(a, m, k);
        b = fma(b, m, k);
        c = fma(c, m, k);
        d = fma(d, m, k);
    }
    out[gid.x] = a + b + c + d;
}
