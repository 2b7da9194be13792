"""The quality experiment: does pre-gating cost accuracy? (Hwang et al. 2024: Xsum ROUGE-1 38.1 -> 38.0.)

On the bundled Debian task (package description -> synopsis), with `configs/debian_small.gin`:
  1. conventional: trained from scratch with conventional routing;
  2. pregated:     trained from scratch with pre-gated routing (same data, steps, seed);
  3. converted:    the conventional model turned pre-gated (block N's pre-gate initialized from block
                   N+1's gate) and fine-tuned for --finetune_steps more steps at its final learning rate.
Each is scored on the validation split (ROUGE-1/2/L, greedy) with the inference engine. Writes
results.json (commands, machine, metrics, throughput), results.md, loss_curves.png and each run's
metrics_<run>.jsonl to --out.

    python scripts/quality_experiment.py --workdir runs/quality --out docs/quality          # GPU: ~10 min
    python scripts/quality_experiment.py --tiny --workdir /tmp/q --out /tmp/q/report       # CPU smoke

Every phase is a plain `scripts/train.py` / `scripts/evaluate.py` run, recorded with its command; a phase
whose output exists is skipped, and training resumes from its checkpoints, so a killed run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RUNS = ("conventional", "pregated", "converted")
# --tiny: a 4+4-layer model for a CPU smoke run of the whole pipeline (minutes, meaningless scores)
# (2 MoE blocks per stack, so that pre-gating differs from conventional routing)
TINY_OVERRIDES = ("{'d_model': 64, 'd_ff': 128, 'd_kv': 16, 'num_heads': 4, 'num_layers': 4, "
                  "'num_decoder_layers': 4, 'num_sparse_encoder_layers': 2, 'num_sparse_decoder_layers': 2, "
                  "'num_experts': 4, 'expert_capacity': None, 'routing': %ROUTING}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training runs and evaluations go here")
    p.add_argument("--out", required=True, help="the report: results.json, results.md, loss_curves.png")
    p.add_argument("--gin_file", default="configs/debian_small.gin", help="relative to the repository root")
    p.add_argument("--steps", type=int, default=3000, help="from-scratch training steps (both routings)")
    p.add_argument("--finetune_steps", type=int, default=1000, help="steps after converting to pre-gated")
    p.add_argument("--eval_examples", type=int, default=500, help="validation examples scored with ROUGE")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CPU smoke run)")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING",
                   help="extra gin binding for every training run, e.g. TrainingConfig.batch_size=32")
    return p.parse_args(argv)


def run(cmd: list[str], log: Path) -> float:
    """Runs cmd with its output tee'd to log; -> wall seconds. Fails loudly with the log's tail."""
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith("train:"):  # tqdm redraws go to the log only
                sys.stdout.write("  " + line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"error: exit {code} from {' '.join(cmd)} (log: {log})")
    return time.perf_counter() - t


def train_cmd(args, workdir: Path, routing: str, steps: int, extra: list[str]) -> list[str]:
    cmd = [PY, "scripts/train.py", "--gin_file", args.gin_file, "--workdir", str(workdir),
           f"--gin.ROUTING='{routing}'", f"--gin.TrainingConfig.num_steps={steps}",
           f"--gin.TrainingConfig.eval_every={args.eval_every}",
           f"--gin.TrainingConfig.checkpoint_every={args.eval_every}"]
    if args.tiny:
        cmd += [f"--gin.ModelConfig.overrides={TINY_OVERRIDES}", "--gin.TrainingConfig.batch_size=8",
                "--gin.TrainingConfig.max_input_len=64", "--gin.TrainingConfig.max_target_len=16",
                "--gin.TrainingConfig.eval_steps=2", "--gin.OptimizerConfig.warmup_steps=10"]
    return cmd + [f"--gin.{b}" for b in args.gin] + extra


def phase(args, work: Path, name: str) -> tuple[Path, str, int, list[str]]:
    """(workdir, routing, steps, extra train.py arguments) of one run of the experiment."""
    if name != "converted":
        return work / name, name, args.steps, []
    lr = final_learning_rate(work / "conventional")  # fine-tune at the conventional run's final rate
    return work / name, "pregated", args.finetune_steps, [
        f"--gin.InitConfig.from_checkpoint='{work / 'conventional'}'", "--gin.InitConfig.convert_to_pregated=True",
        "--gin.OptimizerConfig.schedule='constant'", f"--gin.OptimizerConfig.learning_rate={lr}",
        "--gin.OptimizerConfig.warmup_steps=0"]


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last(metrics: list[dict], key: str):
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def final_learning_rate(workdir: Path) -> float:
    lr = last(read_metrics(workdir), "train/learning_rate")
    if lr is None:
        raise SystemExit(f"error: no train/learning_rate in {workdir / 'metrics.jsonl'}")
    return lr


def shown(path: Path) -> Path:
    """path relative to the repository root when inside it (the commands run there), else absolute."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def machine() -> dict:
    info = {}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        info["gpu"] = None
    import jax
    info.update(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))
    return info


def main(argv=None):
    args = parse_args(argv)
    work, out = shown(Path(args.workdir)), Path(args.out).resolve()
    os.chdir(ROOT)  # every phase runs from the repository root, with paths relative to it
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    state_path = work / "experiment.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}}
    save = lambda: state_path.write_text(json.dumps(state, indent=1))  # noqa: E731

    for name in RUNS:
        wd, routing, steps, extra = phase(args, work, name)
        entry = state["runs"].setdefault(name, {})
        wd.mkdir(parents=True, exist_ok=True)
        if "train_s" not in entry:
            cmd = train_cmd(args, wd, routing, steps, extra)
            entry.update(train_cmd=" ".join(cmd[1:]), train_s=run(cmd, wd / "train.log"))
            save()
        if "rouge" not in entry:
            ev = wd / "eval"
            cmd = [PY, "scripts/evaluate.py", "--checkpoint", str(wd), "--task", "debian", "--workdir", str(ev),
                   "--max_examples", str(args.eval_examples), "--max_new_tokens", "24", "--batch_size", "32",
                   "--max_input_len", "256", "--pad_to_multiple", "128"]
            entry.update(eval_cmd=" ".join(cmd[1:]), eval_s=run(cmd, wd / "eval.log"))
            scores = json.loads((ev / "scores.json").read_text())
            entry["rouge"] = scores["metrics"]
            entry["engine_mode"] = scores["settings"]["mode"]  # the mode evaluate.py resolved
            save()
        m = read_metrics(wd)
        entry.update(steps=steps, final_train_loss=last(m, "train/cross_entropy"),
                     final_eval_loss=last(m, "eval/cross_entropy"),
                     steps_per_s=last(m, "train/steps_per_s"), examples_per_s=last(m, "train/examples_per_s"))
        save()

    state.update(machine=machine(), command=" ".join(["python", "scripts/quality_experiment.py"] + (argv or sys.argv[1:])),
                 gin_file=args.gin_file, eval_examples=args.eval_examples)
    save()
    write_report(state, work, out, args.steps)
    print(f"wrote {out / 'results.md'}")


def write_report(state: dict, work: Path, out: Path, steps: int):
    (out / "results.json").write_text(json.dumps(state, indent=1))
    runs = state["runs"]
    lines = ["# Quality: conventional vs pre-gated vs converted\n",
             f"Machine: `{state['machine'].get('gpu') or state['machine'].get('device')}`, jax "
             f"{state['machine'].get('jax')}. Command: `{state['command']}`. Model and data: "
             f"`{state['gin_file']}` (Debian descriptions -> synopsis). ROUGE on the first "
             f"{state['eval_examples']} validation examples, greedy, 24 new tokens.\n",
             "| model | training steps | ROUGE-1 | ROUGE-2 | ROUGE-L | final train CE | final eval CE "
             "| train steps/s | examples/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for name in RUNS:
        r = runs.get(name)
        if not r:
            continue
        rouge = r.get("rouge", {})
        total = r["steps"] + (steps if name == "converted" else 0)
        steps_txt = f"{steps} + {r['steps']}" if name == "converted" else str(total)
        lines.append(f"| {name} | {steps_txt} | {f(rouge.get('rouge1'), '.2f')} | {f(rouge.get('rouge2'), '.2f')} "
                     f"| {f(rouge.get('rougeL'), '.2f')} | {f(r.get('final_train_loss'), '.3f')} "
                     f"| {f(r.get('final_eval_loss'), '.3f')} | {f(r.get('steps_per_s'), '.1f')} "
                     f"| {f(r.get('examples_per_s'), '.0f')} |")
    lines.append("\nCommands (from the repository root):\n")
    for name in RUNS:
        if name in runs and "train_cmd" in runs[name]:
            lines.append(f"- {name}: `python {runs[name]['train_cmd']}`, then `python {runs[name]['eval_cmd']}`")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    for name in RUNS:  # the curves' raw data beside the plot
        if (work / name / "metrics.jsonl").exists():
            shutil.copyfile(work / name / "metrics.jsonl", out / f"metrics_{name}.jsonl")
    plot(work, out / "loss_curves.png", steps)


def plot(work: Path, path: Path, steps: int):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curves.png (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(RUNS, ("tab:blue", "tab:orange", "tab:green")):
        m = read_metrics(work / name)
        offset = steps if name == "converted" else 0
        for ax, key in zip(axes, ("train/cross_entropy", "eval/cross_entropy")):
            pts = [(r["step"] + offset, r[key]) for r in m if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, color=color, marker="o" if key.startswith("eval") else None,
                        markersize=3)
    for ax, title in zip(axes, ("train cross-entropy", "validation cross-entropy")):
        ax.set_title(title)
        ax.set_xlabel("step (converted: after the conventional run)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
