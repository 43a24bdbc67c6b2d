"""Runs pytest on one test file: the main of every Bazel py_test in tests/."""

import os
import sys

import pytest


def main(argv):
  if len(argv) != 2:
    sys.exit(f'usage: {argv[0]} TEST_FILE')
  args = [argv[1], '-p', 'no:cacheprovider']
  tmpdir = os.environ.get('TEST_TMPDIR')  # Set by `bazel test`.
  if tmpdir:
    args.append(f'--basetemp={os.path.join(tmpdir, "pytest")}')
  xml_output = os.environ.get('XML_OUTPUT_FILE')
  if xml_output:
    args.append(f'--junitxml={xml_output}')
  return pytest.main(args)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
