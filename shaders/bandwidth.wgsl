// Memory-bandwidth probe: a streaming copy of vec4<f32> (16-byte loads and stores), one element per invocation.
// Bytes moved per dispatch = 2 × the buffer size.

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < arrayLength(&dst)) {
        dst[i] = src[i];
    }
}
