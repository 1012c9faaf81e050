"""Search network3 recipe settings fast on a GPU with a PyTorch replica (not a cnnkit dependency).

The GPU machines lent to this project have PyTorch but no TensorFlow, so this script copies
cnnkit's network3 recipe (recipes/nielsen_network3.yaml) into PyTorch to compare many settings
over many seeds in minutes; the setting it points to is then run with cnnkit itself on the CPU,
and only those cnnkit runs count as results (docs/RESULTS.md, "Network3: a GPU search...").

What is copied: 20C5-MP2-40C5-MP2-D0.5-FC1000-D0.5-FC1000-D0.5 with ReLU; Keras's He-normal
(truncated) for the ReLU layers and Glorot-uniform for the softmax layer, zero biases; pixels
/255; Nielsen's one-pixel shifts (each image one of five views, equal odds, zeros in); AdamW
(epsilon 1e-7, decoupled decay on kernels only) or Nesterov SGD (decay on kernels both as L2 in
the gradient and decoupled, as the sweep ran); the rate
cosine-annealed per step to 0 after an optional linear warm-up; a stratified 10% validation split
unless ``train`` is 60000. Float32 without TF32 (cnnkit uses mixed_bfloat16 on the CPU).

Each job is ``SETTING@SEEDS``; jobs run in ``--workers`` processes sharing the GPU, and each
finished job appends one JSON line (final test and validation accuracy) to ``--out``.

Example (one H100, 15 workers: about 280 s per 60-epoch run), then the table of what is in the file:
    python bench/network3_sweep_torch.py --data mnist.npz --out results.jsonl \\
        --jobs n60k_wd1e-1_ep60@0-7 n60k_wd5e-2_ep60@0-8 base@0-1
    python bench/network3_sweep_torch.py --out results.jsonl --summary

With ``--probs DIR`` each run also saves its test probabilities, and ``--ensembles`` scores every
five-run ensemble of each setting from them:
    python bench/network3_sweep_torch.py --data mnist.npz --out results.jsonl --probs probs --jobs ...
    python bench/network3_sweep_torch.py --data mnist.npz --probs probs --ensembles
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time

SETTINGS = {  # changes to the recipe's AdamW 1e-3, weight decay 1e-4, 30 epochs, batch 128, 54,000 images
    "base": {},
    "ep60": {"epochs": 60},
    "ep100": {"epochs": 100},
    "lr2e-3": {"lr": 2e-3},
    "wd5e-2": {"wd": 5e-2},
    "wd5e-2_ep60": {"wd": 5e-2, "epochs": 60},
    "b64_ep60": {"batch": 64, "epochs": 60},
    "b256_lr2e-3_ep60": {"batch": 256, "lr": 2e-3, "epochs": 60},
    "nesterov_ep60": {"opt": "nesterov", "lr": 0.05, "wd": 5e-4, "warmup": 2, "epochs": 60},
    "px2_ep60": {"pixels": 2, "epochs": 60},
    "swa_ep60": {"epochs": 60, "swa": 0.25},
    "n60k_ep60": {"train": 60000, "epochs": 60},
    "n60k_ep100": {"train": 60000, "epochs": 100},
    "n60k_b256_lr2e-3_ep60": {"train": 60000, "batch": 256, "lr": 2e-3, "epochs": 60},
    "n60k_nesterov_ep60": {"train": 60000, "opt": "nesterov", "lr": 0.05, "wd": 5e-4, "warmup": 2, "epochs": 60},
    "n60k_wd5e-2_ep60": {"train": 60000, "wd": 5e-2, "epochs": 60},
    "n60k_wd1e-1_ep60": {"train": 60000, "wd": 1e-1, "epochs": 60},
    "n60k_wd2e-1_ep60": {"train": 60000, "wd": 2e-1, "epochs": 60},
    "n60k_wd1e-2_ep60": {"train": 60000, "wd": 1e-2, "epochs": 60},
    "n60k_wd2e-2_ep60": {"train": 60000, "wd": 2e-2, "epochs": 60},
}
DEFAULTS = {"opt": "adamw", "lr": 1e-3, "wd": 1e-4, "epochs": 30, "batch": 128, "warmup": 0,
            "train": 54000, "pixels": 1, "swa": 0.0}


def train_network3(setting, seed, data_path, device="cuda", probs_dir=None):
    """One run of ``setting`` -> a dict of its settings and final test/validation accuracy.

    With ``probs_dir``, its softmax outputs on the test images go to ``SETTING_sSEED.npy`` there.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    config = {**DEFAULTS, **SETTINGS[setting]}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with np.load(data_path) as arrays:
        x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    order = rng.permutation(len(x_train))
    if config["train"] < len(x_train):  # stratified 10% validation split
        val_index = np.concatenate([order[y_train[order] == c][: round(0.1 * (y_train == c).sum())] for c in range(10)])
    else:
        val_index = order[:0]
    train_index = np.setdiff1d(order, val_index)

    def tensors(x, y):
        return (torch.tensor(x, device=device).float().div_(255).unsqueeze(1), torch.tensor(y, device=device).long())

    x_tr, y_tr = tensors(x_train[train_index], y_train[train_index])
    x_val, y_val = tensors(x_train[val_index], y_train[val_index])
    x_te, y_te = tensors(x_test, y_test)

    class Network3(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 40, 5)
            self.fc1, self.fc2, self.out = nn.Linear(640, 1000), nn.Linear(1000, 1000), nn.Linear(1000, 10)
            for layer in (self.conv1, self.conv2, self.fc1, self.fc2):  # Keras he_normal
                std = math.sqrt(2 / layer.weight[0].numel()) / 0.87962566103423978
                nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(layer.bias)
            limit = math.sqrt(6 / 1010)  # Keras glorot_uniform
            nn.init.uniform_(self.out.weight, -limit, limit)
            nn.init.zeros_(self.out.bias)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
            x = F.relu(self.fc1(F.dropout(x, 0.5, self.training)))
            x = F.relu(self.fc2(F.dropout(x, 0.5, self.training)))
            return self.out(F.dropout(x, 0.5, self.training))

    model = Network3().to(device)
    kernels = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [{"params": kernels, "weight_decay": config["wd"]}, {"params": biases, "weight_decay": 0.0}]
    if config["opt"] == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config["lr"], eps=1e-7)
    else:  # as the sweep ran: L2 in the gradient (torch's SGD) and Keras's decoupled decay below, both wd
        optimizer = torch.optim.SGD(groups, lr=config["lr"], momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_tr) / config["batch"])
    total_steps, warmup_steps = steps_per_epoch * config["epochs"], steps_per_epoch * config["warmup"]

    def rate(step):
        if step < warmup_steps:
            return config["lr"] * (step + 1) / warmup_steps
        return config["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    most = config["pixels"]
    rows_and_cols = torch.arange(28, device=device)[None, :] + most

    def shift(images):  # cnnkit's RandomPixelShift: none, up, down, left or right by 1..most pixels
        batch = images.shape[0]
        direction = torch.randint(0, 5, (batch,), device=device)
        distance = torch.randint(1, most + 1, (batch,), device=device)
        down = torch.where(direction == 1, -distance, torch.where(direction == 2, distance, 0))
        right = torch.where(direction == 3, -distance, torch.where(direction == 4, distance, 0))
        padded = F.pad(images, (most, most, most, most))
        rows = (rows_and_cols - down[:, None])[:, None, :, None].expand(batch, 1, 28, 28 + 2 * most)
        cols = (rows_and_cols - right[:, None])[:, None, None, :].expand(batch, 1, 28, 28)
        return torch.gather(torch.gather(padded, 2, rows), 3, cols)

    @torch.no_grad()
    def probabilities(net, x):
        net.eval()
        out = torch.cat([F.softmax(net(x[i:i + 2000]), 1) for i in range(0, len(x), 2000)])
        net.train()
        return out

    def accuracy(net, x, y):
        return (probabilities(net, x).argmax(1) == y).float().mean().item() if len(x) else None

    swa_start = int(config["epochs"] * (1 - config["swa"])) if config["swa"] else None
    swa_model, swa_count, step, start = None, 0, 0, time.time()
    for epoch in range(config["epochs"]):
        permutation = torch.randperm(len(x_tr), device=device)
        for i in range(steps_per_epoch):
            index = permutation[i * config["batch"]:(i + 1) * config["batch"]]
            for group in optimizer.param_groups:
                group["lr"] = rate(step)
            if config["opt"] == "nesterov":
                with torch.no_grad():
                    for kernel in kernels:
                        kernel.mul_(1 - rate(step) * config["wd"])
            loss = F.cross_entropy(model(shift(x_tr[index])), y_tr[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if swa_start is not None and epoch >= swa_start:  # equal-weight average of the last epochs
            swa_count += 1
            if swa_model is None:
                swa_model = copy.deepcopy(model)
            with torch.no_grad():
                for averaged, current in zip(swa_model.parameters(), model.parameters()):
                    averaged.mul_((swa_count - 1) / swa_count).add_(current / swa_count)
    result = {"setting": setting, "seed": seed, "test": accuracy(model, x_te, y_te),
              "val": accuracy(model, x_val, y_val), "seconds": round(time.time() - start, 1), **config}
    if swa_model is not None:
        result["swa_test"] = accuracy(swa_model, x_te, y_te)
    if probs_dir:
        np.save(f"{probs_dir}/{setting}_s{seed}.npy", probabilities(model, x_te).cpu().numpy())
    return result


def _worker(jobs, next_job, results, data_path, device, probs_dir):
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    while True:
        with next_job.get_lock():
            index, next_job.value = next_job.value, next_job.value + 1
        if index >= len(jobs):
            break
        results.put(train_network3(*jobs[index], data_path, device, probs_dir))
    results.put(None)


def parse_jobs(items):
    """``["base@0-3", "ep60@4"]`` -> ``[("base", 0), ..., ("ep60", 4)]``, ordered by seed."""
    jobs = []
    for item in items:
        setting, _, seeds = item.partition("@")
        if setting not in SETTINGS:
            raise SystemExit(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
        first, _, last = seeds.partition("-")
        jobs += [(setting, seed) for seed in range(int(first), int(last or first) + 1)]
    return sorted(jobs, key=lambda job: job[1])


def summarize(path):
    """Print a table of test accuracy per setting (seeds, mean, spread) from a results file."""
    by_setting = {}
    with open(path) as lines:
        for result in map(json.loads, lines):
            by_setting.setdefault(result["setting"], []).append((result["seed"], 100 * result["test"]))
    print("| setting | runs | mean test accuracy | range | per seed |\n|---|---|---|---|---|")
    for setting, runs in sorted(by_setting.items(), key=lambda item: -statistics.mean(a for _, a in item[1])):
        accuracies = [accuracy for _, accuracy in sorted(runs)]
        print(f"| {setting} | {len(runs)} | {statistics.mean(accuracies):.2f}% | {min(accuracies):.2f}-"
              f"{max(accuracies):.2f}% | {', '.join(f'{a:.2f}' for a in accuracies)} |")


def summarize_ensembles(probs_dir, data_path, size=5):
    """Print, per setting with ``size`` or more saved runs, the test accuracy of every ``size``-run
    ensemble by mean probability and by vote (all subsets scored, none picked)."""
    import itertools
    import pathlib

    import numpy as np

    with np.load(data_path) as arrays:
        labels = arrays["y_test"]
    by_setting = {}
    for path in sorted(pathlib.Path(probs_dir).glob("*_s*.npy")):
        setting, _, seed = path.stem.rpartition("_s")
        by_setting.setdefault(setting, {})[int(seed)] = np.load(path)
    print(f"| setting | runs | mean single | {size}-run ensembles, mean probability: mean (range) | vote: mean |")
    print("|---|---|---|---|---|")
    for setting, runs in sorted(by_setting.items()):
        if len(runs) < size:
            continue
        singles = [np.mean(p.argmax(1) == labels) for p in runs.values()]
        means, votes = [], []
        for subset in itertools.combinations(runs.values(), size):
            means.append(np.mean(np.mean(subset, 0).argmax(1) == labels))
            ballots = np.stack([np.eye(10)[p.argmax(1)] + 1e-3 * p for p in subset])  # ties by probability
            votes.append(np.mean(ballots.sum(0).argmax(1) == labels))
        print(f"| {setting} | {len(runs)} | {100 * np.mean(singles):.2f}% | {100 * np.mean(means):.2f}% "
              f"({100 * min(means):.2f}-{100 * max(means):.2f}%) | {100 * np.mean(votes):.2f}% |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="mnist.npz")
    parser.add_argument("--out", help="JSON lines file to append results to")
    parser.add_argument("--jobs", nargs="+", help="SETTING@FIRST-LAST seeds")
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--summary", action="store_true", help="only print the table of --out's results")
    parser.add_argument("--probs", help="folder for each run's test probabilities (SETTING_sSEED.npy)")
    parser.add_argument("--ensembles", action="store_true",
                        help="only print the ensembles of the runs in --probs (labels from --data)")
    args = parser.parse_args()
    if args.summary:
        return summarize(args.out)
    if args.ensembles:
        return summarize_ensembles(args.probs, args.data)
    if not (args.data and args.jobs and args.out):
        parser.error("--data, --jobs and --out are needed to run jobs (or --summary, --ensembles to print results)")
    jobs = parse_jobs(args.jobs)
    if args.probs:
        os.makedirs(args.probs, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    results, next_job = context.Queue(), context.Value("i", 0)
    workers = [context.Process(target=_worker, args=(jobs, next_job, results, args.data, args.device, args.probs))
               for _ in range(min(args.workers, len(jobs)))]
    for worker in workers:
        worker.start()
    finished = 0
    with open(args.out, "a") as out:
        while finished < len(workers):
            result = results.get()
            if result is None:
                finished += 1
                continue
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(f"{result['setting']} seed {result['seed']}: test {result['test']:.2%} ({result['seconds']} s)", flush=True)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
