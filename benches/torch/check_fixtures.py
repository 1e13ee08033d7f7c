"""Proves lfm_dit.py equal to LFM's network and sampling call: reproduces the golden fixtures that LFM's own
PyTorch code produced (tests/fixtures: dit_tiny, dit_tiny_cond_cfg, ode_dopri5) on the CPU, with the tolerances of
the fixtures' README. Exits non-zero on any mismatch.

    python3 benches/torch/check_fixtures.py [--fixtures tests/fixtures]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lfm_dit import DiT, sample  # noqa: E402

failures = []


def check(name, got, ref, rel=1e-5, abs_=1e-6):
    """Elementwise |got − ref| ≤ rel·max|ref| + abs_, as the fixtures' README asks."""
    got, ref = got.detach().double(), ref.double()
    err = (got - ref).abs().max().item()
    bound = rel * ref.abs().max().item() + abs_
    ok = got.shape == ref.shape and err <= bound
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |Δ| {err:.3g} (bound {bound:.3g})")
    if not ok:
        failures.append(name)


def equal(name, got, ref):
    ok = got == ref
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {got} (reference {ref})")
    if not ok:
        failures.append(name)


def model_of(folder):
    kwargs = json.loads((folder / "config.json").read_text())["constructor"]["kwargs"]
    model = DiT(kwargs["img_resolution"], kwargs["patch_size"], kwargs["in_channels"], kwargs["hidden_size"],
                kwargs["depth"], kwargs["num_heads"], kwargs["mlp_ratio"], kwargs["num_classes"],
                kwargs["label_dropout"]).eval()
    weights = load_file(folder / "model.safetensors")
    # The table lfm_dit computes must be the one LFM stored in its checkpoint.
    check(f"{folder.name}: pos_embed", model.pos_embed, weights["pos_embed"])
    model.load_state_dict(weights, strict=True)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        folder = args.fixtures / "dit_tiny"
        io = load_file(folder / "io.safetensors")
        model = model_of(folder)
        check("dit_tiny: v = model(t, x)", model(io["t"], io["x"]), io["v"])
        check("dit_tiny: scalar t", model(io["t_scalar"].reshape(()), io["x"]), io["v_scalar_t"])

        folder = args.fixtures / "dit_tiny_cond_cfg"
        io = load_file(folder / "io.safetensors")
        cond = model_of(folder)
        check("dit_tiny_cond_cfg: v = model(t, x, y)", cond(io["t"], io["x"], io["y"]), io["v"])
        scale = json.loads((folder / "config.json").read_text())["cfg"]["cfg_scale"]
        guided = cond.forward_with_cfg(io["cfg.t"].reshape(()), io["cfg.x"], io["cfg.y"], scale)
        check("dit_tiny_cond_cfg: forward_with_cfg", guided, io["cfg.v"])

    io = load_file(args.fixtures / "ode_dopri5" / "io.safetensors")
    x0, nfe = sample(model, io["x1"], "dopri5")
    equal("ode_dopri5: dopri5 evaluations", nfe, int(io["nfe"].item()))
    check("ode_dopri5: dopri5 x0", x0, io["x0"], rel=1e-5, abs_=1e-5)
    for method in ["euler", "midpoint", "rk4"]:
        x0, nfe = sample(model, io["x1"], method, step_size=0.05)
        equal(f"ode_dopri5: {method} evaluations", nfe, int(io[f"{method}.nfe"].item()))
        check(f"ode_dopri5: {method} x0", x0, io[f"{method}.x0"], rel=1e-5, abs_=1e-5)

    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        sys.exit(1)
    print("all checks passed: lfm_dit.py computes LFM's DiT, its guidance and its sampling call")


if __name__ == "__main__":
    main()
