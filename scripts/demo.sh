#!/usr/bin/env bash
# `make demo`: what this host offers and a throwaway sandbox's report, then a
# busybox container run by `tegmen` inside its own microVM.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/target/debug"

"$bin/supervisor" check --boot

echo
echo "== tegmen run: a busybox container in its own microVM"
bundle=$(mktemp -d /tmp/tegmen-demo.XXXXXX)
trap 'rm -rf "$bundle"' EXIT
mkdir -p "$bundle/rootfs/bin"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$bundle/rootfs/bin/$applet"
done
(cd "$bundle" && "$bin/tegmen" spec)
python3 - "$bundle/config.json" <<'PY'
import json, sys
path = sys.argv[1]
spec = json.load(open(path))
spec["process"]["terminal"] = False
spec["process"]["args"] = ["sh", "-c",
    "echo Hello from a busybox container inside a Tegmen microVM; "
    "echo \"guest kernel: $(uname -r), hostname: $(hostname), processes: $(ls -d /proc/[0-9]* | wc -l)\""]
json.dump(spec, open(path, "w"), indent=2)
PY
echo "\$ tegmen run -b $bundle demo-$$"
"$bin/tegmen" run -b "$bundle" "demo-$$"
echo "exit status: $?"
