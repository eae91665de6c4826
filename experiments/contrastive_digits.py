"""Contrastive image-text training on the bundled digits, offline: the
reference's two-tower model (image V-MoE + text transformer) and LIMoE's
shared multimodal MoE, with zero-shot accuracy on caption templates never
seen in training, and LIMoE's per-modality expert usage.

Captions are generated from each image: the digit's name, and its size and
position read off the image (the bright digit strokes, not the dimmer
clutter), e.g. "a handwritten seven, small, top left". The tokenizer is a
word-level Hugging Face `tokenizers` model built from the training captions
only, so the unseen templates' new words are unknown tokens.

Usage: python experiments/contrastive_digits.py [--steps 600] [--out runs/contrastive]
Writes OUT/results.json and OUT/expert_usage_by_modality.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time

import numpy as np
import torch

from vmoe_torch.config.contrastive import ContrastiveConfig, contrastive_presets
from vmoe_torch.data.digits import make_cluttered_digits
from vmoe_torch.data.pipeline import to_model_range
from vmoe_torch.models.contrastive import ContrastiveModel, sigmoid_loss, zero_shot_accuracy, zero_shot_classifier

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = ["a handwritten {d}, {size}, {pos}", "a {size} {d} at the {pos}", "the digit {d} written by hand",
                   "{d}", "a {d} in the {pos}, {size}"]
UNSEEN_TEMPLATES = ["a photo of the number {d}", "an image showing a {d}", "this is a {d}"]
MAX_LEN = 10


def attributes(images: torch.Tensor) -> list[tuple[str, str]]:
    """(size, position) words of each (N, 3, H, W) uint8 image, from its
    bright pixels (the digit is drawn at 0.8-1.0, clutter at most 0.6)."""
    out = []
    for im in images[:, 0].float().numpy() / 255:
        ys, xs = np.nonzero(im > 0.75)
        if len(ys) == 0:
            out.append(("small", "middle"))
            continue
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        h, w = im.shape
        vert = "top" if ys.mean() < h / 2 else "bottom"
        horiz = "left" if xs.mean() < w / 2 else "right"
        out.append(("small" if extent < 0.4 * h else "large", f"{vert} {horiz}"))
    return out


def build_tokenizer(captions: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    """(N, MAX_LEN) ids: words, then [EOS], padded with [EOS] (the
    reference's convention: the last position holds an end token)."""
    eos = tok.token_to_id("[EOS]")
    rows = []
    for text in texts:
        ids = tok.encode(text).ids[: MAX_LEN - 1]
        rows.append(ids + [eos] * (MAX_LEN - len(ids)))
    return torch.tensor(rows)


def config(shared: bool) -> ContrastiveConfig:
    """The named models (`create_contrastive_model`): a V-MoE-Mi/8 image
    tower (E=8, K=2, every other block, as the demo) and a 2-block text
    tower, or LIMoE's shared backbone with its entropy losses."""
    return contrastive_presets()["limoe_mi8_every2_e8_k2" if shared else "contrastive_mi8_every2_e8_k2"]


def train(shared: bool, steps: int, data, tok) -> tuple[ContrastiveModel, float]:
    train_ds, captions = data
    torch.manual_seed(0)
    cfg = config(shared)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=tok.get_vocab_size()))
    model = ContrastiveModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    rng = np.random.default_rng(0)
    start = time.time()
    for step in range(steps):
        idx = rng.choice(len(train_ds), 64, replace=False)
        images = to_model_range(train_ds.images[idx])
        texts = encode(tok, [random.Random(int(step * 64 + j)).choice(captions[i]) for j, i in enumerate(idx)])
        loss = sigmoid_loss(model(images, texts)).mean() + model.auxiliary_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{'LIMoE' if shared else 'two-tower'} step {step}: loss {float(loss.detach()):.4f}", flush=True)
    return model.eval(), time.time() - start


def expert_usage(model: ContrastiveModel, images: torch.Tensor, texts: torch.Tensor) -> dict[str, dict[str, list]]:
    """Per MoE layer and modality, the share of tokens whose top-1 expert is e."""
    from vmoe_torch.analysis.recording import record_routing
    usage: dict[str, dict[str, list]] = {}
    for modality, run in (("image", lambda: model(images=images)), ("text", lambda: model(texts=texts))):
        with torch.no_grad(), record_routing(model.image) as rec:
            run()
        for layer, plans in rec.items():
            top1 = torch.cat([p["expert_index"][..., 0].reshape(-1) for p in plans])
            counts = torch.bincount(top1, minlength=model.config.image.moe.num_experts).float()
            usage.setdefault(layer, {})[modality] = (counts / counts.sum()).tolist()
    return usage


def plot_usage(usage: dict[str, dict[str, list]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(usage)
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        e = np.arange(len(usage[layer]["image"]))
        ax.bar(e - 0.2, usage[layer]["image"], width=0.4, label="image tokens")
        ax.bar(e + 0.2, usage[layer]["text"], width=0.4, label="text tokens")
        ax.set(title=f"LIMoE {layer}", xlabel="expert (top-1)", ylabel="share of the modality's tokens")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="runs/contrastive")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    train_ds, test_ds = make_cluttered_digits(seed=0, image_size=40, train_renders=6, test_renders=5, clutter=1)
    attrs = attributes(train_ds.images)
    captions = [[t.format(d=NAMES[int(y)], size=a[0], pos=a[1]) for t in TRAIN_TEMPLATES]
                for y, a in zip(train_ds.labels, attrs)]
    tok = build_tokenizer([c for cs in captions for c in cs])
    prompts = {name: [encode(tok, [t.format(d=NAMES[c]) for t in templates]) for c in range(10)]
               for name, templates in (("seen templates, digit only", ["{d}", "the digit {d} written by hand"]),
                                       ("unseen templates", UNSEEN_TEMPLATES))}
    test_batches = [(to_model_range(test_ds.images[i:i + 256]), test_ds.labels[i:i + 256])
                    for i in range(0, len(test_ds), 256)]
    results: dict = {"steps": args.steps, "train_images": len(train_ds), "test_images": len(test_ds),
                     "vocab": tok.get_vocab_size()}
    for shared in (False, True):
        name = "LIMoE (shared MoE backbone)" if shared else "two-tower (V-MoE image tower)"
        model, seconds = train(shared, args.steps, (train_ds, captions), tok)
        row = {"train_seconds": round(seconds, 1)}
        for pname, prompt in prompts.items():
            row[f"zero-shot top-1, {pname}"] = zero_shot_accuracy(model, zero_shot_classifier(model, prompt),
                                                                  test_batches)
        if shared:
            idx = torch.arange(256)
            texts = encode(tok, [captions[int(i)][0] for i in idx])
            row["expert_usage"] = expert_usage(model, to_model_range(train_ds.images[idx]), texts)
            plot_usage(row["expert_usage"], os.path.join(args.out, "expert_usage_by_modality.png"))
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "expert_usage"}, flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
