"""The presets and their download cache.

A preset is downloaded once into the cache and kept only once it loads;
every later use re-hashes it against the digest recorded then. A cached
file that is no longer weights is deleted; one that is weights for another
model is kept.
"""

import hashlib
import http.client
import os
import re
import tempfile
import urllib.request

from absl import logging

from smope_jax import workdir
from smope_jax.errors import MissingWeightsError
from smope_jax.weights import base
from smope_jax.weights.base import UnreadableWeightsError

_IBOT = ("https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/"
         "2022/ibot")


def _timm_hub(name):
  return (f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors",
          f"{name}.safetensors")


# name -> (download URL, file name in the cache and on a mirror).
PRESETS = {
    "sup21k": _timm_hub("vit_base_patch16_224.augreg_in21k"),
    "sup1k": _timm_hub("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    # The earlier augreg 21k -> 1k checkpoint: the baselines' published runs.
    "sup1k_coda": _timm_hub("vit_base_patch16_224.augreg_in21k_ft_in1k"),
    "ibot21k": (f"{_IBOT}/vitb_16_pt22k/checkpoint_student.pth",
                "ibot_vitb16_pt22k_student.pth"),
    "ibot1k":
        (f"{_IBOT}/vitb_16/checkpoint_teacher.pth", "ibot_vitb16_teacher.pth"),
    "dino1k": _timm_hub("vit_base_patch16_224.dino"),
    # The original ViT paper's ImageNet-21k checkpoint, without a head
    # (HiDe-Prompt's backbone; `sup21k` is a later, different network).
    "orig_in21k": _timm_hub("vit_base_patch16_224.orig_in21k"),
}
_MAX_DOWNLOAD_BYTES = 8 << 30


def check_cache(preset: str) -> None:
  """A preset not yet in the cache needs a cache it can be downloaded into.

  A cached preset is only read, so a read-only shared cache that holds it
  is fine.
  """
  directory = workdir.weights_cache_dir()
  if os.path.isfile(os.path.join(directory, PRESETS[preset][1])):
    return
  workdir.check_writable(directory, f"the weights cache for {preset!r}",
                         "cache directory with SMOPE_JAX_CACHE=DIR")


def _preset_location(name, cache_dir, base_url):
  """(URL, cache path) of a preset; `base_url` names a mirror."""
  url, filename = PRESETS[name]
  base_url = base_url or os.environ.get("SMOPE_JAX_WEIGHTS_URL")
  if base_url:
    url = f'{base_url.rstrip("/")}/{filename}'
  cache_dir = (os.path.expanduser(cache_dir)
               if cache_dir else workdir.weights_cache_dir())
  return url, os.path.join(cache_dir, filename)


def load_preset(name, load, cache_dir, base_url):
  """Loads a preset from the cache, or downloads, checks and caches it.

  `load(path, label)` reads and checks a file against the model. A download
  enters the cache only once it loads, so a truncated, wrong or junk
  download never breaks later runs.
  """
  url, path = _preset_location(name, cache_dir, base_url)
  if os.path.exists(path):
    return _load_cached(path, load)
  tmp, digest = _download(url, path, name)
  try:
    params = load(tmp, f"the download of {name!r} from {url}")
    os.replace(tmp, path)
  except MissingWeightsError as e:
    base.remove(tmp)
    raise MissingWeightsError(f"{e}; nothing was cached") from e
  except BaseException:
    base.remove(tmp)
    raise
  _write_sidecar(path, digest)
  return params


def _load_cached(path, load):
  """Loads a cached preset; one that cannot be read is deleted.

  Every use re-hashes the file against its `.sha256` sidecar. A file put
  there by hand (no sidecar) is read and checked like a download and gets
  its sidecar then. A readable file that does not fit this model is kept:
  it may well be the right preset for another model size.
  """
  sidecar = path + ".sha256"
  try:
    recorded = _read_sidecar(sidecar)
    digest = base.sha256_file(path)
  except OSError as e:
    raise MissingWeightsError(f"cannot read the cached weights {path} "
                              f"({base.reason(e)})") from e
  try:
    if recorded is not None and digest != recorded:
      raise UnreadableWeightsError(
          f"cached weights {path} are corrupted (sha256 {digest}, recorded "
          f"{base.shown(recorded)})")
    params = load(path, path)
  except UnreadableWeightsError as e:
    raise MissingWeightsError(f"{e}; {_discard(path, sidecar)}") from e
  if recorded is None:
    _write_sidecar(path, digest)
  return params


def _read_sidecar(sidecar):
  """The recorded sha256 of a cached file, or None if there is none."""
  if not os.path.exists(sidecar):
    return None
  with open(sidecar, "rb") as f:
    return f.read(200).decode("ascii", "replace").strip()


def _write_sidecar(path, digest):
  """Records the digest of an admitted file, atomically; best effort."""
  try:
    with workdir.atomic_file(path + ".sha256") as f:
      f.write(digest + "\n")
  except OSError as e:
    logging.warning(
        "cannot record the sha256 of %s (%s); it is re-read "
        "and checked on every use instead", path, e)


def _discard(path, sidecar):
  """Deletes a bad cached file; says what happened."""
  try:
    base.remove(path)
    base.remove(sidecar)
  except OSError as e:
    return (f"deleting the cached file failed ({base.reason(e)}); delete "
            f"{path} by hand")
  return "the cached file was deleted, run again to download it anew"


class _EtagRecorder(urllib.request.HTTPRedirectHandler):
  """Keeps Hugging Face's X-Linked-Etag (the LFS sha256) from redirects."""

  def __init__(self):
    self.etags = []

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    self.etags.append(headers.get("X-Linked-Etag"))
    return super().redirect_request(req, fp, code, msg, headers, newurl)


class _BadDownload(Exception):
  """The server answered, but not with the complete file."""


def _content_length(headers):
  """The announced size, or None; a malformed one is an error."""
  value = headers.get("Content-Length")
  if value is None:
    return None
  if not re.fullmatch(r"\s*\d{1,15}\s*", value):
    raise _BadDownload(f"the server sent an invalid Content-Length "
                       f"{base.shown(repr(value))}")
  return int(value)


def _receive(resp, f):
  """Copies a response body to `f`; returns its sha256 hex digest."""
  if resp.headers.get_content_type() == "text/html":
    raise _BadDownload("the server sent an HTML page, not a weights file")
  length = _content_length(resp.headers)
  if length is not None and length > _MAX_DOWNLOAD_BYTES:
    raise _BadDownload(f"the server announced {length} bytes, more than any "
                       "ViT backbone file")
  digest, size = hashlib.sha256(), 0
  for chunk in iter(lambda: resp.read(1 << 22), b""):
    size += len(chunk)
    if size > _MAX_DOWNLOAD_BYTES:
      raise _BadDownload(f"the server sent more than {_MAX_DOWNLOAD_BYTES} "
                         "bytes, more than any ViT backbone file")
    f.write(chunk)
    digest.update(chunk)
  if length is not None and size != length:
    raise _BadDownload(f"got {size} of {length} bytes")
  return digest.hexdigest()


def _download(url, path, name):
  """Downloads to a new temp file next to `path`; returns (temp, sha256).

  Checks what can be checked before reading the file: the status, the
  Content-Length, the content type and Hugging Face's LFS digest. The temp
  file is removed on any failure.
  """
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    # Hidden, and with the same extension, which tells the format.
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix=f".{os.path.basename(path)}.part-",
                               suffix=os.path.splitext(path)[1])
  except OSError as e:
    raise MissingWeightsError(
        f"cannot write to the weights cache {directory} ({base.reason(e)}); "
        "set SMOPE_JAX_CACHE to a writable directory") from e
  recorder = _EtagRecorder()
  try:
    logging.info("downloading %s to %s", url, path)
    with os.fdopen(fd, "wb") as f, urllib.request.build_opener(recorder).open(
        url, timeout=60) as resp:
      recorder.etags.append(resp.headers.get("X-Linked-Etag"))
      digest = _receive(resp, f)
    lfs = [
        e for e in (str(e).strip('"').lower() for e in recorder.etags if e)
        if re.fullmatch("[0-9a-f]{64}", e)
    ]
    if lfs and digest != lfs[0]:
      raise _BadDownload(f"the file is corrupted: sha256 {digest}, the "
                         f"server announced {lfs[0]}")
  except (OSError, ValueError, http.client.HTTPException, _BadDownload) as e:
    base.remove(tmp)
    reason = str(e) if isinstance(e, _BadDownload) else base.reason(e)
    raise MissingWeightsError(
        f"pretrained weights {name!r} are not cached and could not be "
        f"downloaded from {url} ({reason}); nothing was cached: fetch "
        f"that file elsewhere and place it at {path}, or pass "
        "--config.pretrained=/path/to/file") from e
  except BaseException:
    base.remove(tmp)
    raise
  return tmp, digest
