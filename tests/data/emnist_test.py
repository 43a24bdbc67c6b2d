"""Tests for tff_fad.data.emnist (offline behaviour, no network used)."""

import os
import sqlite3
import urllib.error

import pytest
import tensorflow_federated as tff

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from tff_fad.data import emnist


def _make_database(path, tables=('examples', 'client_metadata')):
  with sqlite3.connect(path) as connection:
    for t in tables:
      connection.execute(f'CREATE TABLE {t} (client_id TEXT, v BLOB)')
      # Several pages of data, so that truncation is detectable.
      connection.execute(f'INSERT INTO {t} VALUES (?, ?)', ('w0', b'x' * 20000))
  connection.close()


def _offline_loader(cache_dir, writes_partial=False):
  calls = []

  def load_data(only_digits=True, cache_dir=None):
    calls.append((only_digits, cache_dir))
    if writes_partial:  # TFF writes the stream to the final path as it goes.
      with open(os.path.join(cache_dir, emnist.CACHE_FILENAME), 'wb') as f:
        f.write(b'SQLite format 3\x00' + b'\0' * 200)
    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

  return load_data, calls


def test_offline_raises_clear_error(tmp_path, monkeypatch):
  load_data, calls = _offline_loader(str(tmp_path))
  monkeypatch.setattr(tff.simulation.datasets.emnist, 'load_data', load_data)
  with pytest.raises(emnist.EmnistUnavailableError) as info:
    emnist.load_emnist(cache_dir=str(tmp_path), only_digits=False)
  message = str(info.value)
  assert 'name resolution' in message
  assert 'network' in message and str(tmp_path) in message
  assert emnist.CACHE_FILENAME in message
  # No chained urllib traceback is shown to the user.
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert calls == [(False, str(tmp_path))]


def test_failed_download_removes_partial_file(tmp_path, monkeypatch):
  load_data, _ = _offline_loader(str(tmp_path), writes_partial=True)
  monkeypatch.setattr(tff.simulation.datasets.emnist, 'load_data', load_data)
  with pytest.raises(emnist.EmnistUnavailableError):
    emnist.load_emnist(cache_dir=str(tmp_path))
  assert not os.path.exists(tmp_path / emnist.CACHE_FILENAME)


def test_truncated_cache_is_detected_before_tff_uses_it(tmp_path, monkeypatch):
  path = tmp_path / emnist.CACHE_FILENAME
  _make_database(path)
  assert emnist.check_cached_database(str(path)) is None
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # An interrupted download.
  load_data, calls = _offline_loader(str(tmp_path))
  monkeypatch.setattr(tff.simulation.datasets.emnist, 'load_data', load_data)
  with pytest.raises(emnist.EmnistUnavailableError, match='truncated'):
    emnist.load_emnist(cache_dir=str(tmp_path))
  assert not calls  # TFF never saw the bad file.
  assert path.exists()  # A user's file is reported, not deleted.


@pytest.mark.parametrize('content, match', [
    (b'', 'not a SQLite'),
    (b'<html>proxy error</html>' * 10, 'not a SQLite'),
])
def test_garbage_cache_is_detected(tmp_path, content, match):
  path = tmp_path / emnist.CACHE_FILENAME
  path.write_bytes(content)
  assert match in emnist.check_cached_database(str(path))


def test_database_without_tables_is_detected(tmp_path):
  path = tmp_path / emnist.CACHE_FILENAME
  _make_database(path, tables=('other',))
  assert 'lacks the tables' in emnist.check_cached_database(str(path))


def test_valid_cache_is_passed_to_tff(tmp_path, monkeypatch):
  _make_database(tmp_path / emnist.CACHE_FILENAME)
  sentinel = (object(), object())
  monkeypatch.setattr(tff.simulation.datasets.emnist, 'load_data',
                      lambda only_digits, cache_dir: sentinel)
  assert emnist.load_emnist(cache_dir=str(tmp_path)) is sentinel
