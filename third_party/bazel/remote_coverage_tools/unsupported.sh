#!/bin/sh
echo "bazel coverage is not supported offline (see third_party/bazel/README.md)" >&2
exit 1
