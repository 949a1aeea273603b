"""Which Hub files a plan needs: downloaded before the merge, or streamed while it runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from frankenmoe.merging.plan import MergePlan
from frankenmoe.sources.hub import Download, HubRepo, Stream


def planned_downloads(plan: MergePlan, stream: bool = False) -> tuple[Download, ...]:
    """The weight files the merge reads that are not in the cache yet, per Hub source.

    The base gives every tensor the forward passes (routers, routing check) read, so all its weight
    files; an expert only the files holding a tensor the plan takes from it (its MLPs, and more when
    it takes part in a merged trunk). With `stream` (--stream-sources) the experts are read over HTTP
    instead, and so is the base unless `base_is_downloaded` says the router pass reads it.
    """
    read: dict[Path, set[Path]] = {}
    for job in plan.jobs:
        for piece in job.pieces:
            read.setdefault(piece.location.file.parent, set()).add(piece.location.file)
    downloads: dict[tuple[str, str], Download] = {}
    sources = [plan.base, *plan.experts, *((plan.shared_expert,) if plan.shared_expert is not None else ())]
    for source in sources:
        repo = source.hub
        if repo is None or (stream and (source is not plan.base or not base_is_downloaded(plan))):
            continue
        if source is plan.base:
            files = {location.file for location in source.tensors.values()}
        else:
            mlp = source.mlp_tensor_names()
            files = {location.file for name, location in source.tensors.items() if name in mlp}
            files |= read.get(repo.folder, set()) & {location.file for location in source.tensors.values()}
        for file in sorted(files):
            name = file.relative_to(repo.folder).as_posix()
            if not repo.cached(name):
                downloads[(repo.repo_id + "@" + repo.commit, name)] = Download(repo, name, repo.files[name])
    return tuple(downloads.values())


def base_is_downloaded(plan: MergePlan) -> bool:
    """Whether --stream-sources still downloads the base: when the routers run prompts through it.

    That pass reads every matrix of the base slice by slice, once per pass (fit's text generation: once
    per generated token), so streaming it would fetch the base again and again, one request per slice.
    The writer reads each source byte once, which is what streaming is for.
    """
    return plan.config.needs_prompts


def planned_streams(plan: MergePlan, downloads: Iterable[Download]) -> tuple[Stream, ...]:
    """The Hub files whose tensors the writer reads over HTTP (those neither cached nor downloaded)."""
    downloaded = {(item.repo.repo_id, item.repo.commit, item.name) for item in downloads}
    read: dict[tuple[str, str, str], int] = {}
    repos: dict[tuple[str, str, str], HubRepo] = {}
    sources = [plan.base, *plan.experts, *((plan.shared_expert,) if plan.shared_expert is not None else ())]
    by_commit = {(source.hub.repo_id, source.hub.commit): source.hub for source in sources if source.hub is not None}
    for job in plan.jobs:
        for piece in job.pieces:
            remote = piece.location.remote
            key = (remote.repo_id, remote.commit, remote.name) if remote is not None else None
            if remote is None or key in downloaded or piece.location.file.is_file():
                continue
            read[key] = read.get(key, 0) + piece.location.nbytes
            repos[key] = by_commit[key[:2]]
    return tuple(Stream(repos[key], key[2], repos[key].files[key[2]], count) for key, count in sorted(read.items()))
