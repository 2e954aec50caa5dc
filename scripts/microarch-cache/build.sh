#!/bin/bash
# Build tests/data/v3-microarch with the real Spack: lmisa@1.0 (and its library lmisalib)
# for the targets x86_64, x86_64_v3 and x86_64_v4, and lmisa@1.1 for x86_64 only, signed
# with the throw-away fixture key. Spack runs isolated (its own config, caches and
# GNUPGHOME under a temporary directory); gcc from the system is the external compiler.
#
#   bash scripts/microarch-cache/build.sh SPACK_DIR [OUT]
#
# SPACK_DIR is laid out like the tests' LAZYMOUNT_TEST_SPACK (spack/, spack-packages/,
# python/). OUT defaults to tests/data/v3-microarch.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
SPACK_DIR=$(cd "${1:?usage: build.sh SPACK_DIR [OUT]}" && pwd)
OUT=${2:-$TOP/tests/data/v3-microarch}
BUILD_ROOT=/tmp/lmisa/opt/spack     # 19 characters: the tests' mount points are shorter
KEY_FPR=1556299A23063ADC6D944541DF5162CFF05DB8B3

T=$(mktemp -d /tmp/lmisa-spack.XXXXXX)
trap 'rm -rf "$T" /tmp/lmisa' EXIT
mkdir -p "$T/cfg" "$T/sys" "$T/gnupg"
chmod 700 "$T/gnupg"
export SPACK_ROOT=$SPACK_DIR/spack SPACK_PYTHON=$SPACK_DIR/python/bin/python
export SPACK_USER_CONFIG_PATH=$T/cfg SPACK_SYSTEM_CONFIG_PATH=$T/sys \
       SPACK_USER_CACHE_PATH=$T/cache SPACK_GNUPGHOME=$T/gnupg
spack() { "$SPACK_ROOT/bin/spack" "$@"; }

cat > "$T/cfg/repos.yaml" <<YAML
repos::
  lmisa: $HERE/repo/spack_repo/lmisa
  builtin: $SPACK_DIR/spack-packages/repos/spack_repo/builtin
YAML
cat > "$T/cfg/config.yaml" <<YAML
config:
  install_tree:
    root: $BUILD_ROOT
  build_stage: [$T/stage]
  misc_cache: $T/misc
  source_cache: $T/sources
YAML
# Bootstrapping stays on (with "enable: false" Spack 1.1 refuses to sign at all), but it
# takes gpg from PATH and so downloads nothing: gpg must be installed.
command -v gpg >/dev/null || { echo "build.sh: gpg is needed" >&2; exit 1; }
# build for targets this machine may not have (x86_64_v4)
printf 'concretizer:\n  targets:\n    host_compatible: false\n' > "$T/cfg/concretizer.yaml"
cat > "$T/cfg/packages.yaml" <<YAML
packages:
  gcc:
    externals:
    - spec: gcc@$(gcc -dumpfullversion) languages:='c,c++'
      prefix: /usr
      extra_attributes:
        compilers:
          c: /usr/bin/gcc
          cxx: /usr/bin/g++
    buildable: false
YAML

spack gpg trust "$TOP/tests/data/keys/lazymount-fixtures.secret.asc"
for spec in "lmisa@1.0 target=x86_64" "lmisa@1.0 target=x86_64_v3" \
            "lmisa@1.0 target=x86_64_v4" "lmisa@1.1 target=x86_64"; do
    # shellcheck disable=SC2086
    spack install --fresh $spec
done

rm -rf "$OUT"
for hash in $(spack find --format '{hash}' lmisa lmisalib); do
    spack buildcache push --only package --key "$KEY_FPR" "$OUT" "/$hash"
done
spack buildcache update-index "$OUT"
spack find -l --format '{name}@{version} {arch} {hash}' lmisa lmisalib
