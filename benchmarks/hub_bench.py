"""Hub sources against a local Hub (tests/hub_server.py): bytes fetched, time, peak disk and memory.

    python benchmarks/hub_bench.py --shape large --experts 4 [--gate-mode random]

The base and experts of benchmarks/synthetic_models.py are served as Hub repos, each also carrying a
`pytorch_model.bin` copy of its weights (a hard link: what many 7B repos hold next to their
safetensors). Two merges of the same config run as child processes (`python -m frankenmoe merge`),
each with an empty Hugging Face cache: download-then-merge (the default) and `--stream-sources`.
Per run: the bytes the server sent, against what `hf download` of the same repos fetches (every file
of every repo); wall and CPU seconds of the child; its peak RSS (ru_maxrss from wait4; this process
imports neither torch nor frankenmoe, so the child's figure is its own); and the peak disk used by the
cache plus the output (its parent folder, where the staging folder is), polled with `du`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from tests.hub_server import HubServer  # noqa: E402  (the repository root is on the path from here on)

WORK = REPOSITORY / "benchmarks" / ".cache" / "hub-bench"
DISK_SAMPLE_S = 0.2


@dataclass(frozen=True)
class Run:
    mode: str
    served_bytes: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_disk_bytes: int
    output_bytes: int
    cache_bytes_after: int


def model_folders(shape: str, experts: int) -> tuple[Path, list[Path]]:
    """The synthetic models, generated (or reused) by a child so that torch never loads here."""
    command = [sys.executable, "benchmarks/synthetic_models.py", "--shape", shape, "--experts", str(experts), "--json"]
    line = subprocess.run(command, cwd=REPOSITORY, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    folders = json.loads(line)
    return Path(folders["base"]), [Path(folder) for folder in folders["experts"]]


def hub_repo(model: Path, folder: Path) -> Path:
    """The model's files as hard links, plus the pytorch_model.bin copy a merge must not fetch."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in model.iterdir():
        if file.is_file() and file.name != "complete.json":
            os.link(file, folder / file.name)
    os.link(model / "model.safetensors", folder / "pytorch_model.bin")
    return folder


def disk_used(paths: list[Path]) -> int:
    existing = [str(path) for path in paths if path.exists()]
    if not existing:
        return 0
    result = subprocess.run(["du", "-sb", "-c", *existing], capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    return int(lines[-1].split()[0]) if lines else 0


def run_merge(hub: HubServer, config: Path, mode: str, extra: list[str], keep: bool) -> Run:
    root = WORK / "runs" / mode
    shutil.rmtree(root, ignore_errors=True)
    (root / "out-parent").mkdir(parents=True)
    cache = root / "hf"
    out = root / "out-parent" / "out"
    environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(cache), "HF_HUB_DISABLE_XET": "1"}
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        environment.pop(name, None)
    command = [sys.executable, "-m", "frankenmoe", "merge", str(config), str(out), "--no-check", *extra]
    peak_disk = 0
    done = threading.Event()

    def poll_disk() -> None:
        nonlocal peak_disk
        while not done.is_set():
            peak_disk = max(peak_disk, disk_used([cache, root / "out-parent"]))
            done.wait(DISK_SAMPLE_S)

    poller = threading.Thread(target=poll_disk, daemon=True)
    sent_before = hub.sent_bytes
    started = time.monotonic()
    poller.start()
    process = subprocess.Popen(command, cwd=REPOSITORY, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    done.set()
    poller.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode}: the merge failed with exit code {os.waitstatus_to_exitcode(status)}")
    run = Run(
        mode=mode,
        served_bytes=hub.sent_bytes - sent_before,
        wall_s=round(wall, 1),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        peak_rss_bytes=usage.ru_maxrss * 1024,
        peak_disk_bytes=max(peak_disk, disk_used([cache, root / "out-parent"])),
        output_bytes=disk_used([out]),
        cache_bytes_after=disk_used([cache]),
    )
    if not keep:
        shutil.rmtree(root)  # before the next run: the disk need not hold both
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="large")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--gate-mode", default="random", help="random streams the base too; hidden downloads it")
    parser.add_argument("--keep", action="store_true", help="keep the outputs and caches under benchmarks/.cache")
    args = parser.parse_args()
    base, experts = model_folders(args.shape, args.experts)
    repos = {"bench/base": base, **{f"bench/expert{index}": folder for index, folder in enumerate(experts, 1)}}
    hub = HubServer()
    for repo_id, model in repos.items():
        hub.add(repo_id, hub_repo(model, WORK / "repos" / repo_id.replace("/", "--")))
    config = WORK / "config.yaml"
    lines = ["base_model: bench/base", f"gate_mode: {args.gate_mode}", "experts:"]
    for repo_id in list(repos)[1:]:
        lines += [f"  - source_model: {repo_id}", f'    positive_prompts: ["{repo_id}"]']
    config.write_text("\n".join(lines) + "\n")
    hf_download_bytes = sum(
        file.stat().st_size for repo in hub.repos.values() for file in repo.folder.iterdir() if file.is_file()
    )
    try:
        with hub.start():
            runs = [
                run_merge(hub, config, "download-then-merge", [], args.keep),
                run_merge(hub, config, "stream-sources", ["--stream-sources"], args.keep),
            ]
    finally:
        if not args.keep:
            shutil.rmtree(WORK / "runs", ignore_errors=True)
    report = {
        "shape": args.shape,
        "experts": args.experts,
        "gate_mode": args.gate_mode,
        "hf_download_bytes": hf_download_bytes,
        "runs": [asdict(run) for run in runs],
    }
    print(json.dumps(report, indent=2))
    print(f"\nhf download of the {len(repos)} repos: {hf_download_bytes / 1e9:.2f} GB")
    print("| run | bytes fetched | wall s | CPU s | peak RSS GB | peak disk GB | output GB |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run.mode} | {run.served_bytes / 1e9:.2f} GB | {run.wall_s} | {run.cpu_s} | "
            f"{run.peak_rss_bytes / 1e9:.2f} | {run.peak_disk_bytes / 1e9:.2f} | {run.output_bytes / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()
