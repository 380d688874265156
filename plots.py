"""
The figures of the quick start and of the P-Former experiment, drawn with matplotlib (headless, to PNG files):
loss curves from the train scripts' log.jsonl files, a grid of held-out scenes with what each model said, and
accuracy / CIDEr against the number of image-text pairs with the spread over seeds.
"""
import json

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def read_log(path):
    """(training points, validation points) of a log.jsonl: [(step, loss)], [(step, val_loss)]."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return train, val


def loss_curves(logs, path):
    """One panel per run: its training loss and, where logged, its validation loss, against the step.
    logs: [(title, log.jsonl path)]."""
    fig, axes = plt.subplots(1, len(logs), figsize=(3.2 * len(logs), 2.8), squeeze=False)
    for ax, (title, log_path) in zip(axes[0], logs):
        train, val = read_log(log_path)
        if train:
            ax.plot(*zip(*train), color="tab:blue", label="training")
        if val:
            ax.plot(*zip(*val), "o-", color="tab:red", label="validation")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(samples, path):
    """Held-out scenes with what each model said. samples: [(image path, [(label, text, colour)])], one row each."""
    fig, axes = plt.subplots(len(samples), 2, figsize=(11, 1.6 * len(samples)),
                             gridspec_kw=dict(width_ratios=[1, 6]), squeeze=False)
    for (image_path, lines), (ax_img, ax_txt) in zip(samples, axes):
        with Image.open(image_path) as img:
            ax_img.imshow(img.convert("RGB"), interpolation="nearest")
        for ax in (ax_img, ax_txt):
            ax.set_axis_off()
        for k, (label, text, colour) in enumerate(lines):
            ax_txt.text(0.0, 1.0 - k / max(len(lines), 1), f"{label}: {text}", fontsize=8, color=colour,
                        va="top", transform=ax_txt.transAxes, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_vs_pairs(results, metrics, path, reference=None):
    """Each metric against the number of image-text pairs (log axis), one line per arm with the mean over seeds and
    a band from the lowest to the highest seed. results: {arm: {n_pairs: {metric: [value per seed]}}};
    metrics: [(key, axis label)]; reference: {metric key: [(label, value)]} drawn as horizontal lines."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for arm, color in zip(results, ["tab:gray", "tab:orange", "tab:blue", "tab:green"]):
            ns = sorted(results[arm])
            values = [results[arm][n][key] for n in ns]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(ns, mean, "o-", color=color, label=f"{arm} (mean of {len(values[0])} seeds)")
            ax.fill_between(ns, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        ax.set_xscale("log")
        for ref_label, value in (reference or {}).get(key, []):  # labelled at the left edge, whatever the x range
            ax.axhline(value, color="black", linestyle=":", linewidth=1)
            ax.text(0.02, value, ref_label, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        ax.set_xlabel("image-text pairs in stages 1 and 2")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(results), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the legend above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
