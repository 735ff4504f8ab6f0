"""`l4q push`: publish a derivative to the Hugging Face Hub in one commit, through Xet storage.

huggingface_hub does the work (`create_repo`, `create_branch`, `create_commit`); with hf_xet installed
it stores large files through Xet, whose chunk-level dedup means a rerun after an interruption, or a
derivative sharing bytes with what the Hub already holds, sends only the missing chunks. The token
comes from huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`) and is never printed: errors
are one line with the token scrubbed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import L4QError, UsageError
from ..model import check_derivative
from . import card
from .dedup import upload_files


class PushError(L4QError):
    """The Hub refused the upload, or could not be reached."""


@dataclass
class PushPlan:
    repo: str
    revision: str | None
    private: bool
    commit_message: str
    files: list[tuple[str, Path, int]]  # (path in repo, local file, size)
    card: str  # README.md

    @property
    def total_bytes(self) -> int:
        return sum(size for _, _, size in self.files) + len(self.card.encode())


def plan_push(out: Path, repo: str, *, revision: str | None = None, private: bool = False,
              commit_message: str | None = None, base_model: str | None = None, dedup: dict | None = None) -> PushPlan:
    """Everything the push will send, computed locally."""
    check_repo_id(repo)
    out = Path(out)
    check_derivative(out)  # a truncated, NaN or non-Llama-4 model is never planned for upload
    files = upload_files(out)
    root = out if out.is_dir() else out.parent
    derivative = card.describe(out, base_model)
    own_readme = next((f for f in files if f.relative_to(root).as_posix() == "README.md"), None)
    if own_readme is not None and card.CARD_MARKER not in own_readme.read_text(errors="replace"):
        raise UsageError(f"{own_readme} is not an l4q model card; move it away or edit it to include the line "
                         f"{card.CARD_MARKER!r}")
    entries = [(f.relative_to(root).as_posix(), f, f.stat().st_size) for f in files if f != own_readme]
    message = commit_message or f"Upload {derivative.scheme} derivative with l4q"
    return PushPlan(repo, revision, private, message, entries, card.render(derivative, dedup))


def check_repo_id(repo: str) -> None:
    """user/name as the Hub accepts it: huggingface_hub's own rules, and exactly one owner."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UsageError(f"--repo {repo!r} is not a valid Hub repo id (user/name: letters, digits, '-', '_', '.')") from None
    if repo.count("/") != 1:
        raise UsageError(f"--repo {repo!r} must look like user/name")


def recorded_base(out: Path) -> list[Path]:
    """The local base a compressed-tensors derivative was made from, if l4q recorded it and it resolves here."""
    import json

    from ..sources import resolve

    recipe = Path(out) / "l4q_recipe.json"
    if not recipe.is_file():
        return []
    try:
        return [resolve(json.loads(recipe.read_text())["source"]).path]
    except (L4QError, KeyError, ValueError):
        return []


def format_plan(plan: PushPlan, dedup: dict | None) -> str:
    from ..report import fmt_size

    lines = [f"push to https://huggingface.co/{plan.repo}" + (f" (revision {plan.revision})" if plan.revision else "")
             + (" [private]" if plan.private else ""), f"commit message: {plan.commit_message}", "files:"]
    for name, _path, size in plan.files:
        lines.append(f"  {fmt_size(size):>10}  {name}")
    lines.append(f"  {fmt_size(len(plan.card.encode())):>10}  README.md (model card, generated)")
    lines.append(f"total {fmt_size(plan.total_bytes)} in {len(plan.files) + 1} files")
    if dedup:
        t = dedup["total"]
        lines.append(f"dedup estimate (Xet chunks already in {dedup['store']}): {fmt_size(t['deduped_bytes'])} of "
                     f"{fmt_size(t['size'])} ({t['dedup']:.1%}); new bytes to send: {fmt_size(t['new_bytes'])}")
    return "\n".join(lines)


def resolve_token() -> str:
    """The Hub token from huggingface_hub's usual sources; one clear error when there is none or we are offline."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushError("offline (HF_HUB_OFFLINE is set): push needs the network; --dry-run works offline")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token)")
    return token


def push(plan: PushPlan, token: str) -> str:
    """Create the repo (and branch) if missing and upload everything in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        # None leaves the owner's default visibility; --private asks for a private repo
        api.create_repo(plan.repo, private=plan.private or None, exist_ok=True, repo_type="model")
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo, branch=plan.revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path, _ in plan.files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
        info = api.create_commit(plan.repo, operations, commit_message=plan.commit_message, revision=plan.revision)
    except Exception as exc:  # noqa: BLE001 - any failure of the Hub client becomes one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(token, "***")
        raise PushError(f"push to {plan.repo} failed: {type(exc).__name__}: {first_line}") from None
    return info.commit_url
