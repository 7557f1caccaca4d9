#!/usr/bin/env bash
# Real English text for the language-modelling comparison (issue #16), from Debian documentation packages:
# the Linux kernel's documentation (reStructuredText), the Python 3.11 documentation sources, Perl's POD
# manuals, the Debian Administrator's Handbook and the Debian Reference (HTML, English only) and Git's manual
# pages (AsciiDoc text; their HTML renderings are skipped, so no document is there twice). The packages are
# fetched with `apt-get download` (Debian is one of the registries this workplace reaches), unpacked with
# dpkg-deb, and turned into deduplicated token files with a held-out split by text_corpus.py.
#
#   bash benchmarks/quality/debian_corpus.sh [OUT_DIR] [-- TEXT_CORPUS_OPTIONS...]   # default data/prose
#
# The packages' names and versions go to OUT_DIR/debian_packages.txt. The corpus itself is not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-data/prose}
shift $(( $# > 0 ? 1 : 0 ))
[[ "${1:-}" == "--" ]] && shift
packages=(linux-doc-6.12 python3.11-doc perl-doc debian-handbook debian-reference-en git-doc)
for tool in apt-get dpkg-deb; do
    command -v "$tool" > /dev/null || { echo "debian_corpus.sh: needs $tool (a Debian-based system)" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${packages[@]}" > /dev/null 2>&1) || {
    apt-get update -qq && (cd "$work" && apt-get download "${packages[@]}" > /dev/null) \
        || { echo "debian_corpus.sh: apt-get download ${packages[*]} failed" >&2; exit 2; }
}
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/x"
done
x=$work/x
python benchmarks/quality/text_corpus.py \
    "$x/usr/share/doc/linux-doc-6.12/Documentation" \
    "$x/usr/share/doc/python3.11/html/_sources" \
    "$x/usr/share/perl" \
    "$x/usr/share/doc/debian-handbook/html/en-US" \
    "$x/usr/share/debian-reference" \
    "$x"/usr/share/doc/git-doc/*.txt \
    -o "$out" "$@"
for deb in "$work"/*.deb; do
    dpkg-deb -f "$deb" Package Version | paste -sd' '
done > "$out/debian_packages.txt"
echo "packages: $out/debian_packages.txt"
