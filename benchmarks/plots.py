"""Reporting helpers shared by the benchmarks: machine description, JSON/markdown writing, matplotlib figures.

Re-plot a finished quality run from its results folder (no training)::

    python benchmarks/plots.py benchmarks/results/quality-squad-smoke
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

# metric keys as ragtrain writes them to metrics.jsonl, and how they are labelled in figures/tables
QUALITY_METRICS = (("em", "EM"), ("f1", "F1"), ("recall@1", "R@1"), ("recall@5", "R@5"), ("recall@20", "R@20"),
                   ("mrr", "MRR"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The project's commit (with ``+dirty`` when tracked files differ from it), for reproducing a result."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_info() -> dict:
    """CPU model, cores, memory, torch/transformers/faiss versions, GPU if any, load average at the time."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for mod in ("transformers", "accelerate", "faiss", "datasets", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    probes = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, fn in probes.items():  # CPU features that decide whether bf16 pays off
        try:
            info[f"cpu_{name}"] = bool(getattr(torch.cpu, fn)())
        except Exception:  # noqa: BLE001 - private torch helpers; absent on some builds
            info[f"cpu_{name}"] = None
    info["git_commit"] = git_commit()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    try:
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def machine_markdown(info: dict) -> str:
    gpu = info.get("gpu") or "none"
    return (f"{info.get('cpu_model')}, {info.get('logical_cores')} logical cores "
            f"(torch threads {info.get('torch_threads')}), {info.get('memory_gib', '?')} GiB RAM, GPU: {gpu}; "
            f"Python {info.get('python')}, torch {info.get('torch')}, transformers {info.get('transformers', '?')}, "
            f"faiss {info.get('faiss', '?')}; AMX {info.get('cpu_amx', '?')}, AVX512-BF16 {info.get('cpu_avx512_bf16', '?')}; "
            f"1-min load average at start {info.get('load_average_1m_at_start', '?')}; "
            f"commit {info.get('git_commit', '?')}")


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_quality_curves(curves: dict[str, list[dict]], out_png: Path, title: str = "") -> Path:
    """One panel per metric; per arm a line over its validation rows and a star at its final test row.

    ``curves``: arm name -> rows of that arm's ``metrics.jsonl`` (``step``, ``split``, metric keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, lab) for k, lab in (("em", "EM"), ("f1", "F1"), ("recall@5", "recall@5"), ("mrr", "MRR"))]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, styles = "osD^vP", ["-", "--", "-.", ":"]
    max_step = max([r.get("step", 0) for rows in curves.values() for r in rows] + [1])
    n_arms = max(len(curves), 1)
    for ax, (key, label) in zip(axes.flat, metrics):
        for i, (arm, rows) in enumerate(curves.items()):
            c, mk = colors[i % len(colors)], markers[i % len(markers)]
            dx = (i - (n_arms - 1) / 2) * 0.012 * max_step  # small offset so that equal points stay visible
            val = [(r["step"] + dx, r[key]) for r in rows if r.get("split") == "validation" and key in r]
            test = [(r["step"] + dx, r[key]) for r in rows if r.get("split") == "test" and key in r]
            if val:
                ax.plot([s for s, _ in val], [v for _, v in val], marker=mk, linestyle=styles[i % len(styles)],
                        color=c, alpha=0.85, label=f"{arm} (validation)")
            if test:
                ax.plot([s for s, _ in test], [v for _, v in test], "*", color=c, markersize=13,
                        markeredgecolor="black", markeredgewidth=0.5, label=f"{arm} (test, final)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:  # validation lines may be absent from some panels (retrieval-only validation)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(4, len(labels))), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 + 0.025 * (len(labels) // 4), 1, 0.96))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def replot_quality(results_dir: Path) -> Path:
    """Rebuild ``curves.png`` from ``results.json`` + the ``<arm>.metrics.jsonl`` copies in ``results_dir``."""
    results = json.loads((results_dir / "results.json").read_text())
    curves = {arm: read_jsonl(results_dir / f"{arm}.metrics.jsonl") for arm in results["arms"]}
    zs = [r for r in curves.get("zero-shot", []) if r.get("split") == "validation" and r.get("step") == 0]
    for arm in ("rag-original", "rag-end2end"):  # same initialisation: zero-shot is their step 0
        if zs and arm in curves and not any(r.get("step") == 0 for r in curves[arm]):
            curves[arm] = zs + curves[arm]
    return plot_quality_curves(curves, results_dir / "curves.png",
                               title=f"ragtrain quality: {results['dataset']} ({results['scale']})")


if __name__ == "__main__":
    for d in sys.argv[1:] or ["benchmarks/results/quality-squad-smoke"]:
        print(replot_quality(Path(d)))
