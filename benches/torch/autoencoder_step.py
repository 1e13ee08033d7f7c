"""PyTorch's time for lfm's autoencoder training step, for `lfm train-autoencoder`'s images/s to be set against.

The step `lfm train-autoencoder` runs: diffusers' AutoencoderKL built from the same config.json, a batch of images in
[-1, 1], the posterior sampled once, loss = mean squared error of the decoded sample + kl_weight x the mean KL
divergence per latent element, backward, AdamW (no weight decay). Prints images/s per timed round.

    ~/venv-torch/bin/python benches/torch/autoencoder_step.py assets/fashion-mnist/autoencoder-f2.json \\
        --image-size 28 --batch 32 --steps 20
"""

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = json.load(open(args.config))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = AutoencoderKL(**config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    size = args.image_size

    def step():
        x = torch.rand(args.batch, 3, size, size) * 2 - 1
        posterior = model.encode(x).latent_dist
        z = posterior.sample()
        decoded = model.decode(z).sample
        mse = torch.mean((decoded - x) ** 2)
        kl = 0.5 * torch.mean(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar)
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(3):
        step()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - start
        print(f"round {r}: {args.batch * args.steps / seconds:.2f} images/s")


if __name__ == "__main__":
    main()
