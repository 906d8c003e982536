"""The Hugging Face Hub as the loaders meet it: which snapshot a file came from, and which failures mean
"not cached and not reachable" (as opposed to a cached file that is wrong)."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from ingest.errors import LoadError, UserFacingError

# transformers turns the hub client's errors into OSErrors with these texts
_FETCH_TEXTS = re.compile(r"couldn't connect to|does not appear to have (a )?files? named|is not a local folder "
                          r"and is not a valid model identifier|offline mode|not found in the cached files|"
                          r"couldn't find them in the cached files", re.I)


def snapshot_commit(repo_id: str, filename: str) -> str | None:
    """The commit of the cached snapshot that holds ``filename`` of ``repo_id`` (where ``refs/main``
    pointed when it was fetched), or None if it is not in the cache. Reads the cache only."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename)
    if isinstance(path, str):
        parts = Path(path).parts
        i = len(parts) - 1 - parts[::-1].index("snapshots") if "snapshots" in parts else -1
        if 0 <= i < len(parts) - 1:
            return parts[i + 1]
    # a loader that read other files than the one named: the commit refs/main pointed at in the cache
    ref = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def is_fetch_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a file is neither cached nor reachable."""
    from huggingface_hub import errors as hub

    fetch_types: tuple[type[BaseException], ...] = (
        hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, hub.EntryNotFoundError, hub.HfHubHTTPError,
        ConnectionError, TimeoutError)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, fetch_types) or (isinstance(seen, OSError) and _FETCH_TEXTS.search(str(seen))):
            return True
        if type(seen).__module__.split(".")[0] in ("requests", "httpx", "urllib3") and \
                any(w in type(seen).__name__ for w in ("Connect", "Timeout", "NetworkError")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


@contextlib.contextmanager
def hub_errors(what: str, local_hint: str) -> Iterator[None]:
    """Turn a loader's failure into one LoadError line: "could not fetch" for what is missing from the
    cache and unreachable, "could not load" (with the library's reason) for anything else. Library chatter
    printed on stdout goes to stderr, so stdout stays machine-readable."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except UserFacingError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hub client and the loaders raise many types
        if is_fetch_error(exc):
            raise LoadError(f"could not fetch {what} from the Hugging Face Hub ({type(exc).__name__}: "
                            f"{_first_line(exc)}). It is neither cached nor reachable: connect once to cache it "
                            f"(HF_HOME), {local_hint}.") from None
        raise LoadError(f"{what} was found but could not be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                        "its cached files may be incomplete or of another version: delete them from the cache "
                        f"(HF_HOME) to fetch them again, {local_hint}.") from None
