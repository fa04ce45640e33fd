#!/usr/bin/env bash
# Copies what git keeps of an experiment folder run elsewhere (spec.json, the tokenizer, every
# finished run's result.json) into experiments/runs/NAME, so a later session resumes it there.
#   tools/keep_experiment.sh /work/scaling-out/scaling experiments/runs/scaling
set -euo pipefail
src=$1 dest=$2
cd "$src"
find . \( -path ./spec.json -o -path './tokenizer/*' -o -path './arms/*/*/result.json' \) -type f |
while read -r f; do
    mkdir -p "$OLDPWD/$dest/$(dirname "$f")"
    cp "$f" "$OLDPWD/$dest/$f"
done
