#!/usr/bin/env bash
# Creates, updates or reuses the project environment in .venv/ at the
# repository root.
#
#   scripts/bootstrap.sh          # no-op if .venv is up to date, else sync it
#   scripts/bootstrap.sh --force  # delete .venv and build it from scratch
#
# Needs only Python 3.11 and access to PyPI. Steps: python3.11 -m venv .venv,
# pip-install a pinned uv into .venv, `uv pip sync` the lock file (which applies
# the jax/jaxlib override TFF 0.87.0 needs, see README.md), then install
# tff_fad itself in editable mode without dependencies. A stamp file records a
# hash of the inputs, so later runs reuse the environment until they change.
set -euo pipefail

UV_VERSION="0.13.9"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv"
LOCK="requirements/requirements.lock"
STAMP="${VENV}/.tff_fad-stamp"

cd "${ROOT}"

inputs_hash() {
  # Anything that changes what gets installed invalidates the environment.
  cat "${LOCK}" pyproject.toml setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1
}

find_python311() {
  local candidate
  if [[ -n "${PYTHON:-}" ]]; then  # An explicit choice must be 3.11.
    "${PYTHON}" -c 'import sys; assert sys.version_info[:2] == (3, 11)' \
        2>/dev/null && echo "${PYTHON}" && return 0
    echo "bootstrap: PYTHON=${PYTHON} is not a Python 3.11 interpreter." >&2
    return 1
  fi
  for candidate in \
      "$(command -v python3.11 2>/dev/null || true)" \
      "${PYENV_ROOT:-${HOME}/.pyenv}"/versions/3.11*/bin/python3.11; do
    if [[ -n "${candidate}" && -x "${candidate}" ]] &&
        "${candidate}" -c 'import sys; assert sys.version_info[:2] == (3, 11)' \
          2>/dev/null; then
      echo "${candidate}"; return 0
    fi
  done
  return 1
}

# Serialize concurrent runs (e.g. `make test` and `make demo` in parallel).
if command -v flock >/dev/null; then
  exec 9<"${BASH_SOURCE[0]}"
  flock 9
fi

want="$(inputs_hash)"
if [[ "${1:-}" != "--force" && -x "${VENV}/bin/python" && -f "${STAMP}" &&
      "$(cat "${STAMP}")" == "${want}" ]]; then
  exit 0  # Up to date.
fi

if ! PY311="$(find_python311)"; then
  cat >&2 <<'MSG'
bootstrap: Python 3.11 not found.
  tff_fad needs Python 3.11 (TensorFlow Federated 0.87 supports >=3.9,<3.12).
  Looked for `python3.11` on PATH and in pyenv ($PYENV_ROOT/versions/3.11.*).
  Install it (e.g. `apt-get install python3.11 python3.11-venv`, or
  `pyenv install 3.11`), or point PYTHON=/path/to/python3.11 at one.
MSG
  exit 1
fi
if ! "${PY311}" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "bootstrap: ${PY311} lacks the venv/ensurepip modules" \
       "(on Debian/Ubuntu: apt-get install python3.11-venv)." >&2
  exit 1
fi

start=${SECONDS}
if [[ "${1:-}" == "--force" ]] || ! "${VENV}/bin/python" -c \
    'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "bootstrap: creating ${VENV} with ${PY311}" >&2
  rm -rf "${VENV}"
  "${PY311}" -m venv "${VENV}"
else
  # Update in place: `uv pip sync` below only changes what differs.
  echo "bootstrap: updating ${VENV}" >&2
fi
if [[ "$("${VENV}/bin/uv" --version 2>/dev/null)" != "uv ${UV_VERSION}"* ]]; then
  "${VENV}/bin/python" -m pip --version >/dev/null 2>&1 ||
    "${VENV}/bin/python" -m ensurepip --default-pip >/dev/null
  "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
      "uv==${UV_VERSION}"
fi
# `uv pip sync` installs exactly the lock (plus uv itself, so .venv/bin/uv
# stays available for `make lock`) and removes anything else. It also
# compiles site-packages to bytecode: uv does not by default, and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's build machines) Python never caches it,
# so every process recompiled TensorFlow's sources (measured: `import
# tensorflow` 11.9 s without, 3.2 s with).
uv_pin="$(mktemp)"
trap 'rm -f "${uv_pin}"' EXIT
echo "uv==${UV_VERSION}" > "${uv_pin}"
VIRTUAL_ENV="${VENV}" "${VENV}/bin/uv" pip sync --quiet --compile-bytecode \
    --python "${VENV}/bin/python" "${LOCK}" "${uv_pin}"
VIRTUAL_ENV="${VENV}" "${VENV}/bin/uv" pip install --quiet \
    --python "${VENV}/bin/python" --no-deps -e .
if ! out="$(TF_CPP_MIN_LOG_LEVEL=2 "${VENV}/bin/python" -c 'import tff_fad' 2>&1)"; then
  echo "${out}" >&2
  echo "bootstrap: environment built but 'import tff_fad' failed" >&2
  exit 1
fi
echo "${want}" > "${STAMP}"
echo "bootstrap: ready in $((SECONDS - start)) s" >&2
