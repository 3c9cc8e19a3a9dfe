#!/usr/bin/env bash
# Builds Baton's .deb (cargo-deb) and .rpm (cargo-generate-rpm).
#
#   packaging/build.sh [--version V]
#
# V is the full package version, upstream-revision (default: the workspace
# version with revision 1, e.g. 0.1.0-1). The .deb gets V as is; the .rpm
# gets Version = the part before the last '-' and Release = the part after it.
# Only the package version changes: the binaries report the crate version.
#
# Steps: release build of baton, baton-httpd and baton-docgen; man pages and
# completions (baton-docgen), stripped copies of the binaries and the
# maintainer scripts (templates with packaging/upgrade-service.sh inserted)
# under target/packaging; then both packages. Prints the two package paths last, as
# `deb: PATH` and `rpm: PATH`.
#
# Needs: cargo-deb and cargo-generate-rpm (`cargo install --locked cargo-deb
# cargo-generate-rpm`), strip (binutils) and gzip.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

usage() {
	echo "usage: packaging/build.sh [--version UPSTREAM-REVISION]   (e.g. --version 0.1.0-2)" >&2
	exit 2
}

version=""
while (($#)); do
	case "$1" in
	--version)
		(($# >= 2)) || usage
		version=$2
		shift 2
		;;
	--version=*)
		version=${1#--version=}
		shift
		;;
	-h | --help) usage ;;
	*)
		echo "packaging/build.sh: unknown argument '$1'" >&2
		usage
		;;
	esac
done

crate_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
if [[ -z $crate_version ]]; then
	echo "packaging/build.sh: no version in [workspace.package] of $root/Cargo.toml" >&2
	exit 1
fi
version=${version:-$crate_version-1}
# Both formats: digits first; the revision is what follows the last '-'.
if ! [[ $version =~ ^[0-9][0-9A-Za-z.+~]*-[0-9A-Za-z.+~]+$ ]]; then
	echo "packaging/build.sh: version '$version' is not UPSTREAM-REVISION like $crate_version-1" \
		"(letters, digits and . + ~ only; the revision follows the last '-')" >&2
	exit 2
fi
rpm_version=${version%-*}
rpm_release=${version##*-}
if [[ $rpm_version == *-* ]]; then
	echo "packaging/build.sh: '$version': an rpm Version cannot contain '-'; use only one '-' before the revision" >&2
	exit 2
fi

for tool in cargo-deb cargo-generate-rpm; do
	if ! command -v "$tool" >/dev/null; then
		echo "packaging/build.sh: $tool not found: cargo install --locked cargo-deb cargo-generate-rpm" >&2
		exit 1
	fi
done
for tool in strip gzip; do
	if ! command -v "$tool" >/dev/null; then
		echo "packaging/build.sh: $tool not found: apt-get install binutils gzip" >&2
		exit 1
	fi
done

# Reproducible timestamps (file mtimes, changelog date, rpm build time): the
# last commit's, unless the caller set one.
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
	SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

# Cargo's output may live elsewhere (CARGO_TARGET_DIR); what this script
# generates always goes to $root/target/packaging, where Cargo.toml's asset
# lists look for it.
target_dir=${CARGO_TARGET_DIR:-$root/target}
staging=$root/target/packaging

echo "==> cargo build --release (baton, baton-httpd, baton-docgen)" >&2
cargo build --release -p baton -p baton-httpd -p baton-docgen --bins >&2

echo "==> man pages, completions, binaries into $staging" >&2
rm -rf "$staging"
mkdir -p "$staging/bin"
"$target_dir/release/baton-docgen" "$staging" >&2
# -n: no name or timestamp in the gzip header (reproducible); -9: lintian.
gzip -9nf "$staging"/man/*.1
for bin in baton baton-httpd; do
	strip --strip-all --remove-section=.comment --remove-section=.note -o "$staging/bin/$bin" "$target_dir/release/$bin"
done

# The maintainer scripts: packaging/debian/* and packaging/rpm/*.sh with the
# line `#BATON_UPGRADE_SERVICE#` replaced by packaging/upgrade-service.sh
# (the in-place upgrade both packages share), into $staging/debian and
# $staging/rpm, where Cargo.toml takes them from.
mkdir -p "$staging/debian" "$staging/rpm"
for script in packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
	packaging/rpm/post.sh packaging/rpm/preun.sh packaging/rpm/postun.sh; do
	out=$staging/${script#packaging/}
	awk -v fragment=packaging/upgrade-service.sh '
		$0 == "#BATON_UPGRADE_SERVICE#" {
			while ((getline line <fragment) > 0) print line
			close(fragment)
			next
		}
		{ print }
	' "$script" >"$out"
	chmod 755 "$out"
	if grep -q '^#BATON_UPGRADE_SERVICE#$' "$out" || ! sh -n "$out"; then
		echo "packaging/build.sh: generating $out from $script failed" >&2
		exit 1
	fi
done

maintainer=$(sed -n '/^\[package.metadata.deb\]/,/^\[/s/^maintainer *= *"\(.*\)"/\1/p' Cargo.toml)
cat >"$staging/changelog" <<EOF
baton ($version) unstable; urgency=medium

  * Baton $crate_version: the baton supervisor, baton-httpd, their systemd
    units, man pages and shell completions.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF

echo "==> cargo deb" >&2
mkdir -p "$root/target/debian" "$root/target/generate-rpm"
deb=$(cargo deb -p baton --no-build --deb-version "$version" -o "$root/target/debian/" | tail -n 1)

echo "==> cargo generate-rpm" >&2
rpm="$root/target/generate-rpm/baton-$rpm_version-$rpm_release.$(uname -m).rpm"
cargo generate-rpm -p . \
	-s "version = \"$rpm_version\"" -s "release = \"$rpm_release\"" \
	-o "$rpm" >&2

for f in "$deb" "$rpm"; do
	if [[ ! -f $f ]]; then
		echo "packaging/build.sh: expected package $f was not written" >&2
		exit 1
	fi
done
echo "deb: $deb"
echo "rpm: $rpm"
