#!/usr/bin/env bash
# Downloads the Debian -dev packages of the C++ build into .deps/ (default), for a GPU host that
# has CUDA, cmake and torch but no package registry. tools/gpu/run_tests.sh unpacks them there.
#   bash tools/gpu/pack-debs.sh [DIR]
set -euo pipefail
dir=${1:-.deps}
packages=(libfmt-dev libfmt9 libspdlog-dev libspdlog1.10 libyaml-cpp-dev libyaml-cpp0.7 libcli11-dev
          nlohmann-json3-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian zlib1g-dev zlib1g)
mkdir -p "$dir"
[ -n "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ] || apt-get update -qq
(cd "$dir" && apt-get download "${packages[@]}" 2>&1 | grep -v 'Download is performed unsandboxed' || true)
echo "packages in $dir: $(ls -1 "$dir"/*.deb | wc -l)"
