#!/usr/bin/env bash
# Refresh the chat page's vendored libraries (ember/server/ui/vendor/) from the npm registry, at the
# versions pinned below. Nothing is built: the files are the packages' own browser builds, copied as they
# ship, with their licences. Run it, check the page, commit the result (VENDORED.md records the hashes;
# tests/unit/test_ui_files.py checks them).
set -euo pipefail
MARKED=18.2.1      # Markdown -> HTML (MIT)
DOMPURIFY=3.5.0    # HTML sanitiser (MPL-2.0 OR Apache-2.0)
cd "$(dirname "$0")/.."
dest=ember/server/ui/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" >/dev/null)
mkdir -p "$tmp/m" "$tmp/d" "$dest"
tar xzf "$tmp/marked-$MARKED.tgz" -C "$tmp/m"
tar xzf "$tmp/dompurify-$DOMPURIFY.tgz" -C "$tmp/d"
# the source-map comments point at files not shipped here; drop them so browsers do not ask for them
sed '/^\/\/# sourceMappingURL=/d' "$tmp/m/package/lib/marked.umd.js" > "$dest/marked.umd.js"
sed 's|//# sourceMappingURL=.*$||' "$tmp/d/package/dist/purify.min.js" > "$dest/purify.min.js"
cp "$tmp/m/package/LICENSE" "$dest/LICENSE.marked"
cp "$tmp/d/package/LICENSE" "$dest/LICENSE.dompurify"
{
  echo "# Vendored browser libraries of the chat page"
  echo
  echo "Copied from the npm registry by \`tools/vendor_ui.sh\` (do not edit by hand)."
  echo
  echo "| file | package | licence | sha256 |"
  echo "|---|---|---|---|"
  echo "| marked.umd.js | marked@$MARKED | MIT | $(sha256sum "$dest/marked.umd.js" | cut -d' ' -f1) |"
  echo "| purify.min.js | dompurify@$DOMPURIFY | MPL-2.0 OR Apache-2.0 | $(sha256sum "$dest/purify.min.js" | cut -d' ' -f1) |"
} > "$dest/VENDORED.md"
echo "vendored marked@$MARKED and dompurify@$DOMPURIFY into $dest"
