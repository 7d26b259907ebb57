"""``armor_report.json`` and ``armor_report.png`` beside every compressed checkpoint: per-matrix
proxy loss (start and end where the method has both), time, and the run's totals."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from armor_vllm.core.checkpoint import write_json

REPORT_JSON = "armor_report.json"
REPORT_PNG = "armor_report.png"


def write_report(out_dir: Path, summary: dict, metrics: list[dict]) -> None:
    write_json(Path(out_dir) / REPORT_JSON, {"summary": summary, "matrices": metrics})
    plot_losses(Path(out_dir) / REPORT_PNG, {summary["method"]: metrics}, title=_title(summary))


def _title(summary: dict) -> str:
    return f"{Path(summary['model']).name}: {summary['method']} ({summary['order']}), bs={summary['block_size']}"


def plot_losses(path: Path, runs: dict[str, list[dict]], title: str = "") -> bool:
    """Per-layer relative proxy loss, one panel per matrix type, one line per run (method); the
    NoWag-P start is dashed when a run recorded it. Returns False when no run measured a loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({m["name"] for ms in runs.values() for m in ms if m.get("proxy_loss") is not None})
    if not names:
        return False
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, ms in runs.items():
            by_layer = defaultdict(dict)
            for m in ms:
                if m["name"] == name and m.get("proxy_loss") is not None:
                    by_layer[m["layer"]] = m
            if not by_layer:
                continue
            layers = sorted(by_layer)
            line = ax.plot(layers, [by_layer[i]["proxy_loss"] for i in layers], label=label)[0]
            if all("loss_start" in by_layer[i] for i in layers) and label.startswith("armor"):
                ax.plot(
                    layers,
                    [by_layer[i]["loss_start"] for i in layers],
                    "--",
                    color=line.get_color(),
                    alpha=0.6,
                    label=f"{label} start (NoWag-P)",
                )
        ax.set_title(name.split(".")[-1])
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("relative proxy loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
