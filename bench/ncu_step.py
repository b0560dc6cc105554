"""DRAM bytes and kernel launches of one training step, measured by Nsight Compute (device_check.sh).

For each implementation (the PNNH layer on the triton, cuda and eager torch backends, and the cuDNN
ResNet layer relu(bn(conv3x3(x)) + x)) one child process builds the layer at every ResNet-18 CIFAR
stage shape (batch 256, bf16, channels_last, training BatchNorm), warms it up (compilation,
autotuning), then runs one forward + backward per shape between cudaProfilerStart/Stop, each step
preceded by a marker kernel (torch.cuda._sleep) so that the kernels can be told apart by shape.
ncu records dram__bytes_read.sum, dram__bytes_write.sum and gpu__time_duration.sum of every kernel.

ncu replays each kernel with its caches flushed (--cache-control all, its default): each launch
reads its inputs from DRAM, as the traffic ledger assumes (no L2 reuse between launches). Kernel
times under ncu are serialized and cold-cache: they are not the step's wall time.

    python -m bench.ncu_step --out docs/perf
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import subprocess
import sys
from pathlib import Path

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, spatial size), batch 256
IMPLEMENTATIONS = ("cudnn", "triton", "cuda", "torch")
MARKER = "spin_kernel"  # the kernel torch.cuda._sleep launches
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")


def child(implementation: str, batch: int) -> None:
    """Run under ncu: warm up every shape, then one profiled step per shape after a marker. The
    step is the ledger's (pnnh_kernels.ledger.steps): the module built as the ledger builds it,
    forward, then the gradients of x and of every trainable parameter by torch.autograd.grad."""
    import torch

    from pnnh_kernels.ledger.steps import build_step_module, step_inputs

    torch.backends.cudnn.benchmark = False
    device, dtype, channels_last = torch.device("cuda"), torch.bfloat16, torch.channels_last
    steps = []
    for channels, size in SHAPES:
        torch.manual_seed(0)
        name = "resnet-layer" if implementation == "cudnn" else "pnnh-layer"
        layer = build_step_module(name, channels, implementation if name == "pnnh-layer" else "torch")
        layer = layer.to(device, dtype, memory_format=channels_last).train()
        x, grad = step_inputs((batch, channels, size, size), dtype, device)
        inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]

        def step(layer=layer, x=x, grad=grad, inputs=inputs) -> None:
            torch.autograd.grad(layer(x), inputs, grad)

        for _ in range(3):
            step()
        steps.append(step)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for step in steps:
        torch.cuda._sleep(1000)
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ledger_rows(batch: int) -> dict[str, list[dict]]:
    """The ledger's count of the same steps (meta tensors, nothing run)."""
    from pnnh_kernels.ledger import step_ledger

    rows: dict[str, list[dict]] = {}
    for implementation in IMPLEMENTATIONS:
        rows[implementation] = []
        for channels, size in SHAPES:
            if implementation == "cudnn":
                ledger = step_ledger("resnet-layer", batch, channels, size)
            else:
                ledger = step_ledger("pnnh-layer", batch, channels, size, backend=implementation)
            rows[implementation].append(
                {"launches": len(ledger.launches), "read": ledger.read, "written": ledger.written}
            )
    return rows


def parse(log: str) -> list[dict]:
    """Per shape (in SHAPES order): kernels, DRAM bytes read/written, summed kernel time (ns)."""
    start = log.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV in the log")
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(log[start:])):
        if not row.get("ID", "").isdigit():
            continue
        kernel = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        kernel[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    shapes: list[dict] = []
    for kernel in kernels.values():  # in ncu's order: launch order
        if MARKER in kernel["name"]:
            shapes.append({"kernels": 0, "read": 0.0, "write": 0.0, "time_ns": 0.0, "names": []})
            continue
        if not shapes:
            continue
        shapes[-1]["kernels"] += 1
        shapes[-1]["read"] += kernel.get(METRICS[0], 0.0)
        shapes[-1]["write"] += kernel.get(METRICS[1], 0.0)
        shapes[-1]["time_ns"] += kernel.get(METRICS[2], 0.0)
        shapes[-1]["names"].append(kernel["name"][:80])
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=IMPLEMENTATIONS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per implementation")
    parser.add_argument("--out", type=Path, default=Path("docs/perf"))
    parser.add_argument(
        "--reparse",
        metavar="CARD",
        help="write the table again from the ncu_*.csv logs in --out (no GPU), naming CARD",
    )
    parser.add_argument("--torch-version", help="with --reparse: the torch version the logs ran")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch)
        return
    if args.reparse:
        results: dict[str, list[dict] | str] = {}
        for implementation in IMPLEMENTATIONS:
            log_path = args.out / f"ncu_{implementation}.csv"
            try:
                results[implementation] = parse(log_path.read_text())
            except (OSError, ValueError) as error:
                results[implementation] = f"{log_path}: {error}"
        write_table(results, args.out, args.reparse, args.torch_version or "unknown", args.batch)
        return
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for implementation in IMPLEMENTATIONS:
        log_path = args.out / f"ncu_{implementation}.csv"
        command = [
            "ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv",
            "--print-units", "base", "--metrics", ",".join(METRICS), "--log-file", str(log_path),
            sys.executable, "-m", "bench.ncu_step", "--child", implementation,
            "--batch", str(args.batch),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
            results[implementation] = parse(log_path.read_text())
        except Exception as error:  # one failing implementation must not lose the others
            results[implementation] = f"{type(error).__name__}: {error}"[:400].replace("\n", " ")
        result = results[implementation]
        summary = (
            result
            if isinstance(result, str)
            else [(s["kernels"], s["read"] + s["write"]) for s in result]
        )
        print(implementation, summary, flush=True)

    write_table(results, args.out, torch.cuda.get_device_name(0), torch.__version__, args.batch)


def write_table(
    results: dict[str, list[dict] | str], out: Path, card: str, torch_version: str, batch: int
) -> None:
    today = datetime.date.today().isoformat()
    lines = [
        f"# DRAM bytes of one training step, Nsight Compute, {card}, {today}",
        "",
        f"torch {torch_version}; batch {batch}, bf16, channels_last, training BatchNorm; "
        "one forward + backward per shape after warm-up, every kernel profiled with its caches "
        "flushed (ncu's default --cache-control all, --clock-control none). `kernels` counts every "
        "kernel launch of the step (copies and fills included, the marker excluded). The ledger "
        "columns: the same step counted on meta tensors (pnnh_kernels.ledger); DRAM writes that fit "
        "in L2 are written back after a kernel's measurement ends, so compare reads. "
        "Written by bench/ncu_step.py.",
        "",
        "| shape | layer | kernels | DRAM read (MB) | DRAM write (MB) | total (MB) | vs ResNet layer "
        "| kernel time sum (us) | ledger: launches | ledger: read (MB) | ledger: written (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        ledger = ledger_rows(batch)
    except Exception as error:  # the measurement must not be lost to the model
        print(f"ledger failed: {type(error).__name__}: {error}")
        ledger = {}
    for index, (channels, size) in enumerate(SHAPES):
        label = f"{channels}x{size}x{size}"
        base = results.get("cudnn")
        base_total = None
        if isinstance(base, list) and index < len(base):
            base_total = base[index]["read"] + base[index]["write"]
        for implementation in IMPLEMENTATIONS:
            result = results[implementation]
            if isinstance(result, str) or index >= len(result):
                why = result if isinstance(result, str) else "no step recorded"
                lines.append(f"| {label} | {implementation} | failed: {why} | | | | | | | | |")
                continue
            row = result[index]
            total = row["read"] + row["write"]
            ratio = f"{total / base_total:.2f}x" if base_total else "n/a"
            model = ledger.get(implementation, [None] * len(SHAPES))[index]
            modelled = (
                f" {model['launches']} | {model['read'] / 1e6:.1f} | {model['written'] / 1e6:.1f} |"
                if model
                else " | | |"
            )
            lines.append(
                f"| {label} | {implementation} | {row['kernels']} | {row['read'] / 1e6:.1f} | "
                f"{row['write'] / 1e6:.1f} | {total / 1e6:.1f} | {ratio} | {row['time_ns'] / 1e3:.0f} |"
                + modelled
            )
    lines += ["", "Kernels of the 128x16x16 step, in launch order:", ""]
    for implementation in IMPLEMENTATIONS:
        result = results[implementation]
        if isinstance(result, list) and len(result) > 1:
            lines.append(f"- {implementation}: " + "; ".join(result[1]["names"]))
    table = "\n".join(lines) + "\n"
    slug = "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    path = out / f"dram_bytes_{slug}_{today}.md"
    path.write_text(table)
    print(f"\nwritten to {path}\n\n" + "\n".join(lines[: 6 + 5 * len(SHAPES)]))


if __name__ == "__main__":
    main()
