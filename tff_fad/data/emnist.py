"""Federated EMNIST (by writer) through TFF's loader, with clear offline errors.

`tff.simulation.datasets.emnist.load_data` downloads `emnist_all.sqlite.lzma`
and decompresses it to `<cache_dir>/emnist_all.sqlite`. Two things go wrong
for users, and this module turns both into one `EmnistUnavailableError` with
instructions instead of a stack trace:

* Without network it fails with a `urllib.error.URLError`.
* It trusts any existing file in the cache, and writes the decompressed stream
  straight to that path, so an interrupted download leaves a truncated SQLite
  file that is reused on the next run and fails later with "database disk image
  is malformed". We check the file against the size its own SQLite header
  declares before handing it to TFF, and remove a file that we saw fail to
  download.
"""

import os
import sqlite3
import urllib.error
from typing import Optional

import tensorflow_federated as tff

CACHE_FILENAME = 'emnist_all.sqlite'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.tff')
_SQLITE_MAGIC = b'SQLite format 3\x00'
_REQUIRED_TABLES = frozenset({'examples', 'client_metadata'})


class EmnistUnavailableError(RuntimeError):
  """The EMNIST data is neither cached nor downloadable; says how to fix it."""


def _how_to_get_it(cache_dir: str) -> str:
  return (
      'To get it: run once on a machine with network access (the file is '
      f'cached in {cache_dir}), or copy an existing {CACHE_FILENAME} (about '
      f'1.3 GB, from a ~/.tff directory elsewhere) into {cache_dir}. Or use '
      "the embedded offline data (dataset 'digits').")


def check_cached_database(path: str) -> Optional[str]:
  """Returns why the cached SQLite file at `path` is unusable, or None.

  Reads only the 100-byte header and the table list, so it is cheap even for
  the 1.3 GB file: a complete SQLite database is exactly `page_size *
  page_count` bytes as declared in its header, so a shorter file is a partial
  download.

  Args:
    path: Path of the decompressed `emnist_all.sqlite`.
  """
  with open(path, 'rb') as f:
    header = f.read(100)
  if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
    return 'it is not a SQLite database (empty or corrupt download)'
  page_size = int.from_bytes(header[16:18], 'big')
  if page_size == 1:  # The SQLite encoding of 65536.
    page_size = 65536
  page_count = int.from_bytes(header[28:32], 'big')
  expected, actual = page_size * page_count, os.path.getsize(path)
  if actual < expected:
    return (f'it is truncated ({actual:,} of {expected:,} bytes; an '
            'interrupted download)')
  try:
    uri = 'file:' + os.path.abspath(path) + '?mode=ro'
    with sqlite3.connect(uri, uri=True) as connection:
      names = {r[0] for r in connection.execute(
          "SELECT name FROM sqlite_master WHERE type='table'")}
  except sqlite3.DatabaseError as e:
    return f'SQLite cannot read it ({e})'
  missing = _REQUIRED_TABLES - names
  if missing:
    return f'it lacks the tables {sorted(missing)}'
  return None


def load_emnist(
    cache_dir: Optional[str] = None, only_digits: bool = True
) -> tuple[tff.simulation.datasets.ClientData,
           tff.simulation.datasets.ClientData]:
  """Loads federated EMNIST, downloading it into `cache_dir` if needed.

  Elements are `OrderedDict(label=int32[], pixels=float32[28, 28])` with 1.0 as
  the background (TFF's convention).

  Args:
    cache_dir: Where the decompressed database is cached; defaults to
      `~/.tff` like TFF.
    only_digits: Only the 10 digit classes (3,383 writers) instead of all 62.

  Returns:
    `(train, test)` client data, keyed by writer.

  Raises:
    EmnistUnavailableError: If the data is not cached (or only partially)
      and cannot be downloaded. The message says how to get it.
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
  path = os.path.join(cache_dir, CACHE_FILENAME)
  if os.path.exists(path):
    problem = check_cached_database(path)
    if problem is not None:
      raise EmnistUnavailableError(
          f'The cached EMNIST file {path} is unusable: {problem}. Delete it '
          'and download again. ' + _how_to_get_it(cache_dir))
  existed = os.path.exists(path)
  try:
    return tff.simulation.datasets.emnist.load_data(
        only_digits=only_digits, cache_dir=cache_dir)
  except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
    # TFF writes the decompressed stream to the final path as it downloads,
    # so a failure part way leaves a file that would be trusted next time.
    if not existed and os.path.exists(path):
      os.remove(path)
    reason = getattr(e, 'reason', None) or e
    # `from None`: the chained traceback from urllib helps nobody here.
    raise EmnistUnavailableError(
        f'Could not download federated EMNIST into {cache_dir} ({reason}). '
        + _how_to_get_it(cache_dir)) from None
