"""Runs in PyTorch every case that `lfm bench forward|sampling|training --export DIR` recorded, on the same device,
with the same weights and the same noise, and reports lfm / PyTorch for each:

- forward: seconds per pass (median of --reps after one untimed pass), and the largest difference of lfm's output
  from PyTorch's relative to PyTorch's largest value;
- sampling: seconds per image of LFM's sampling call (torchdiffeq, after one untimed solve), the number of velocity
  evaluations of each, and the difference of the final states;
- training: images per second of one flow-matching step (DiT, AdamW, LFM's loss; bf16 through autocast).

f32 runs in full f32 on both sides unless lfm's case allowed TF32 (`lfm --tf32`), in which case PyTorch is timed
with TF32 too, while the agreement column still compares with PyTorch's full-f32 result (TF32's error). Output: a
table on stdout (lfm/PyTorch ratios; < 1 means lfm took less time) and DIR/compare.json.

    python3 benches/torch/compare.py DIR [--device cuda] [--reps 10] [--train-steps 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lfm_dit import DiT, fm_loss, sample  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def allow_tf32(allowed):
    """PyTorch's TF32 switches for matmuls and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    def __init__(self, folder, device, reps, train_steps):
        self.folder, self.device, self.reps, self.train_steps = folder, device, reps, train_steps
        self.models = {}
        self.results = {}

    def model(self, name, weights, dtype):
        """The DiT with the exported weights in `dtype`, loaded afresh for each dtype (a round trip through 16 bits
        would round the f32 weights); one model in memory at a time."""
        if (weights, dtype) not in self.models:
            self.models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model = DiT.named(name).eval()
            model.load_state_dict(load_file(self.folder / weights), strict=True)
            self.models[(weights, dtype)] = model.to(self.device, dtype)
        return self.models[(weights, dtype)]

    def timed(self, run, reps):
        run()
        sync(self.device)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = run()
            sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    def forward(self, rec):
        case = rec["case"]
        dtype = DTYPES[case["precision"]]
        model = self.model(case["model"], rec["weights"], dtype)
        io = load_file(self.folder / rec["tensors"])
        x, t = io["x"].to(self.device, dtype), io["t"].to(self.device)
        with torch.no_grad():
            seconds, v = self.timed(lambda: model(t, x), self.reps)
        return {"torch_s": seconds, "torch_out": v.float().cpu(), "lfm_out": io["v"]}

    def sampling(self, rec):
        case = rec["case"]
        dtype = DTYPES[case["precision"]]
        model = self.model(case["model"], rec["weights"], dtype)
        io = load_file(self.folder / rec["tensors"])
        x1 = io["x1"].to(self.device)

        def velocity(t, x, y=None):
            return model(t, x.to(dtype)).float()

        method = case["solver"]
        # lfm's fixed-step cases run `steps` steps over [1, 0]; torchdiffeq takes the step size.
        step = 1.0 / (case["nfe"] // {"euler": 1, "midpoint": 2, "rk4": 4}.get(method, 1))
        seconds, (x0, nfe) = self.timed(lambda: sample(velocity, x1, method, step_size=step), 1)
        return {"torch_s": seconds / case["batch"], "torch_nfe": nfe, "torch_out": x0.cpu(), "lfm_out": io["x0"]}

    def training(self, rec):
        case = rec["case"]
        self.models.clear()
        torch.manual_seed(0)
        model = DiT.named(case["model"]).to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        n = case["batch"]
        autocast = case["precision"] != "f32"

        def step():
            z0 = torch.randn(n, 4, 32, 32, device=self.device)
            z1 = torch.randn(n, 4, 32, 32, device=self.device)
            t = torch.rand(n, device=self.device)
            with torch.autocast(self.device.type, dtype=DTYPES[case["precision"]], enabled=autocast):
                loss = fm_loss(model, z0, z1, t)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(self.train_steps):
            step()
        sync(self.device)
        seconds = (time.perf_counter() - start) / self.train_steps
        del model, optimizer
        return {"torch_images_per_s": n / seconds}

    def run(self, rec, tf32=None):
        """PyTorch's run of `rec`'s case, with TF32 as lfm's case had it unless `tf32` says otherwise."""
        case = rec["case"]
        tf32 = rec["tf32"] if tf32 is None else tf32
        key = (rec["kind"], case["model"], case["batch"], case["precision"], case.get("solver"), tf32)
        if key not in self.results:
            allow_tf32(tf32)
            self.results[key] = getattr(self, rec["kind"])(rec)
        return self.results[key]


def relative_difference(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    records = [json.loads(line) for line in (args.folder / "cases.jsonl").read_text().splitlines() if line.strip()]
    runner = Runner(args.folder, device, args.reps, args.train_steps)
    rows = []
    print("| case | lfm backend | lfm | PyTorch | lfm / PyTorch | agreement |")
    print("|---|---|---|---|---|---|")
    for rec in records:
        case, kind = rec["case"], rec["kind"]
        if case.get("solver") not in (None, "dopri5", "euler", "midpoint", "rk4"):
            print(f"skipped: torchdiffeq has no '{case['solver']}' solver as lfm defines it", file=sys.stderr)
            continue
        got = runner.run(rec)
        name = f"{kind} {case['model']} {case['precision']}{' TF32' if rec['tf32'] else ''} batch {case['batch']}"
        row = {"kind": kind, "backend": rec["backend"], "tf32": rec["tf32"], "case": case}
        if kind == "training":
            row["lfm"], row["torch"] = case["images_per_s"], got["torch_images_per_s"]
            row["ratio"] = row["lfm"] / row["torch"]
            cells = [f"{row['lfm']:.2f} images/s", f"{row['torch']:.2f} images/s", f"{row['ratio']:.2f} (images/s)", ""]
        else:
            lfm_s = case["seconds"] if kind == "forward" else case["seconds_per_image"]
            row["lfm"], row["torch"] = lfm_s, got["torch_s"]
            row["ratio"] = lfm_s / got["torch_s"]
            # Agreement always against PyTorch in full f32: for a TF32 case it is TF32's error.
            exact = runner.run(rec, tf32=False) if rec["tf32"] else got
            row["max_rel_diff"] = relative_difference(got["lfm_out"], exact["torch_out"])
            agreement = f"max |Δ| / max |ref| {row['max_rel_diff']:.1e}"
            if kind == "sampling":
                name += f" {case['solver']}"
                row["nfe"], row["torch_nfe"] = case["nfe"], exact["torch_nfe"]
                agreement = f"NFE {case['nfe']} vs {exact['torch_nfe']}, {agreement}"
            unit = "s/image" if kind == "sampling" else "s/pass"
            cells = [f"{lfm_s:.4g} {unit}", f"{got['torch_s']:.4g} {unit}", f"{row['ratio']:.2f} (time)", agreement]
        rows.append(row)
        print(f"| {name} | {rec['backend']} | " + " | ".join(cells) + " |", flush=True)
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    (args.folder / "compare.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
