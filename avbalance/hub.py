"""Pretrained weights by name: a Hugging Face model id or a local path, and their fingerprint.

``--face-weights`` and the Wav2Vec2 ``pretrained_dir`` take either a local path or a model id
(``hf-hub:timm/efficientnet_b2.ra_in1k``, ``facebook/wav2vec2-large-robust``). An id is
downloaded once into the usual Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and read
from there afterwards. With ``HF_HUB_OFFLINE=1`` an id is looked up in the cache only, so a
missing one fails at once (no network retries) with a message that says how to pass a local
file instead. Every resolved weights file is fingerprinted (sha256) for the records.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from avbalance.errors import UserError

HF_PREFIX = "hf-hub:"
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def model_id(spec: str) -> str | None:
    """The Hub repo id ``spec`` names, or None for a local path.

    ``hf-hub:ORG/NAME`` is always an id; a bare ``ORG/NAME`` is one only when nothing exists at
    that path and it does not end like a weights file.
    """
    if spec.startswith(HF_PREFIX):
        repo = spec[len(HF_PREFIX):]
        if not _ID.match(repo):
            raise UserError(f"{spec!r} is not a Hugging Face model id (expected hf-hub:ORG/NAME)")
        return repo
    if os.path.exists(spec) or spec.endswith(_FILE_SUFFIXES) or not _ID.match(spec):
        return None
    return spec


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read at call time, as the tests set it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch_file(repo: str, filenames: Sequence[str], what: str, local_hint: str,
               cache_dir: str | None = None) -> str:
    """Local path (in the HF cache) of the first of ``filenames`` the repo has; downloaded once.

    ``what`` names the option in messages (e.g. ``--face-weights``); ``local_hint`` says how to
    pass a local copy instead. Offline, only the cache is looked at.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    local_only = offline()
    for name in filenames:
        try:
            return hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=local_only)
        except LocalEntryNotFoundError:
            if not local_only:  # online but unreachable: the hub's own message says why
                raise UserError(f"{what}: cannot download {name} of model {repo} "
                                f"(no network?). {local_hint}") from None
            continue  # offline: maybe another file name is cached
        except EntryNotFoundError:
            continue  # the repo has no file of that name: try the next
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise UserError(f"{what}: cannot fetch model {repo} from the Hugging Face Hub: "
                            f"{str(err).splitlines()[0]}. {local_hint}") from None
    if local_only:
        raise UserError(
            f"{what} names the Hugging Face model {repo!r}, but HF_HUB_OFFLINE is set and it is not in "
            f"the local cache, so it cannot be downloaded. Run once with network access (without "
            f"HF_HUB_OFFLINE) to download it into the cache, or pass a local copy instead: {local_hint}"
        )
    raise UserError(f"{what}: model {repo} has none of the files {list(filenames)}. {local_hint}")


def weight_sources(model: Any) -> dict[str, dict[str, str]]:
    """``{"model.encoders.<m>": record}`` for every encoder that loaded pretrained weights
    (its ``weights_source``: the id or path it was given and the weights file's sha256)."""
    encoders = getattr(model, "encoders", {})
    return {f"model.encoders.{m}": dict(enc.weights_source) for m, enc in encoders.items()
            if getattr(enc, "weights_source", None)}
