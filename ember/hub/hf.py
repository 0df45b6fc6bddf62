"""Models from the Hugging Face Hub (or a mirror) through huggingface_hub: `ember pull org/name`.

huggingface_hub does the hard parts: parallel files, progress bars, a download that goes on from the
bytes on disk when the connection drops, its shared cache (~/.cache/huggingface/hub, so other tools
see the same files; files already complete are never fetched again). ember reads HF_ENDPOINT,
HF_TOKEN and HF_HUB_CACHE when it is called (not when the library was imported), loads a cached
snapshot without touching the network, and turns the library's exceptions into errors that say what
to do.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from pathlib import Path

from ember.errors import EmberError, ModelNotFoundError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    """'org/name' that is not a local path."""
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists() and not text.endswith(".gguf")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")), "hub")


def hf_pull(repo_id: str, include: list[str] | None = None, revision: str | None = None, *,
            offline_first: bool = False, quiet: bool = False) -> Path:
    """Download (or find in the cache) a repo snapshot; returns the model to load (directory or .gguf).

    offline_first: a complete cached snapshot is used without any network call (what `ember.load`
    does); `ember pull` always asks the hub for the newest revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    kw = dict(repo_id=repo_id, revision=revision, allow_patterns=include or None, cache_dir=_cache_dir(),
              endpoint=_endpoint(), token=os.environ.get("HF_TOKEN") or None,
              # originals in other formats (Meta's consolidated .pth) are never what ember loads
              ignore_patterns=None if include else ["original/*", "*.pth", "*.pt"])
    if offline_first:
        cached = _cached_snapshot(repo_id, revision)
        if cached is not None:
            return _model_in(cached, repo_id, include)
    if not quiet:
        print(f"[ember] downloading {repo_id} from {kw['endpoint']}" + (f" ({', '.join(include)})" if include else ""),
              file=sys.stderr)
    else:
        disable_progress_bars()
    try:
        if not include:  # a GGUF repo holds many quantizations: ask which one before fetching them all
            from huggingface_hub import HfApi

            try:
                files = HfApi(endpoint=kw["endpoint"], token=kw["token"]).list_repo_files(repo_id, revision=revision)
            except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
                raise
            except Exception:  # noqa: BLE001 - network trouble: snapshot_download falls back to the cache
                files = []
            ggufs = [f for f in files if f.endswith(".gguf")]
            if "config.json" not in files and len(ggufs) > 1:
                raise _several(repo_id, [Path(g) for g in ggufs])
        path = Path(snapshot_download(**kw, max_workers=8))
    except GatedRepoError:
        raise EmberError(f"{repo_id} is gated: accept its terms on the hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model repo '{repo_id}' on {kw['endpoint']} (check the name; a private repo "
                                 "needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise EmberError(f"cannot reach {kw['endpoint']} and {repo_id} is not in the cache ({kw['cache_dir']}); "
                         "check the network, or set HF_ENDPOINT to a mirror") from None
    finally:
        if quiet:
            enable_progress_bars()
    return _model_in(path, repo_id, include)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot a previous pull left for this revision (only the files it was asked for), if any."""
    repo = Path(_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() and any(snap.iterdir()) else None


def _several(repo_id: str, ggufs: list[Path]) -> EmberError:
    names = ", ".join(g.name for g in ggufs[:4])
    return EmberError(f"{repo_id} holds several GGUF files ({names}{', ...' if len(ggufs) > 4 else ''}): pick one "
                      f"with --include, e.g. ember pull {repo_id} --include '*Q4_K_M.gguf'")


def _model_in(snapshot: Path, repo_id: str, include: list[str] | None = None) -> Path:
    """A snapshot holding an HF model is that directory; one holding GGUF files is the single .gguf
    (among those `include` matches, when earlier pulls left others beside it)."""
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.rglob("*.gguf"))
    if include:
        ggufs = [g for g in ggufs if any(fnmatch.fnmatch(str(g.relative_to(snapshot)), p) for p in include)]
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise _several(repo_id, ggufs)
    raise EmberError(f"{repo_id} has neither config.json nor a .gguf file in what was downloaded "
                     "(was --include too narrow?)")
