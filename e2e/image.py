#!/usr/bin/env python3
"""Writes a container image as a docker-archive tarball, without Docker or a registry.

    image.py OUT.tar TAG [--entrypoint PATH] [--user UID:GID] [--ldd] FILE=PATH_IN_IMAGE...

One layer holds the given files (mode and content only; owner root, mtime 0, sorted), so the
same inputs always give the same image ID. With --ldd, the shared libraries each executable
needs (as `ldd` lists them on this machine, the image's only source of glibc) are added at the
same paths, which makes release binaries built here runnable FROM scratch. The archive is what
`ctr -n k8s.io images import` (containerd) and `docker load` read: manifest.json, the config
JSON and the layer tar.
"""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile


def ldd_libraries(path):
    """Absolute paths of the shared libraries `path` loads (empty for a static binary)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr:
        return []
    libs = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
        elif parts and parts[0].startswith("linux-vdso"):
            continue
    return libs


def add_dirs(tar, path, seen):
    parent = os.path.dirname(path.rstrip("/"))
    if parent in ("", "/") or parent in seen:
        return
    add_dirs(tar, parent, seen)
    seen.add(parent)
    info = tarfile.TarInfo(parent.lstrip("/"))
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    tar.addfile(info)


def layer_tar(files, texts):
    """files: {path in image: host path}; texts: {path in image: (bytes, mode)}."""
    buf = io.BytesIO()
    seen = set()
    entries = {p: ("file", h) for p, h in files.items()}
    entries.update({p: ("text", t) for p, t in texts.items()})
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            add_dirs(tar, path, seen)
            kind, src = entries[path]
            if kind == "file":
                with open(src, "rb") as f:
                    data = f.read()
                mode = 0o755 if os.access(src, os.X_OK) else 0o644
            else:
                data, mode = src
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("tag", help="e.g. taas:0.1.0 (containerd reads it as docker.io/library/taas:0.1.0)")
    ap.add_argument("--entrypoint", action="append", default=None)
    ap.add_argument("--cmd", action="append", default=None)
    ap.add_argument("--user", default="")
    ap.add_argument("--ldd", action="store_true", help="add the shared libraries of executables")
    ap.add_argument("--passwd", action="store_true", help="add /etc/passwd and /etc/group naming --user")
    ap.add_argument("--ca-certificates", default="", help="host CA bundle to add as /etc/ssl/certs/ca-certificates.crt")
    ap.add_argument("files", nargs="+", metavar="HOST_PATH=IMAGE_PATH")
    args = ap.parse_args()

    files = {}
    for spec in args.files:
        host, sep, image = spec.partition("=")
        if not sep or not image.startswith("/"):
            sys.exit(f"image.py: expected HOST_PATH=/IMAGE_PATH, got {spec!r}")
        if not os.path.isfile(host):
            sys.exit(f"image.py: no such file: {host}")
        files[image] = host
    if args.ldd:
        for host in list(files.values()):
            if os.access(host, os.X_OK):
                for lib in ldd_libraries(host):
                    files.setdefault(lib, os.path.realpath(lib))
    if args.ca_certificates:
        files["/etc/ssl/certs/ca-certificates.crt"] = args.ca_certificates
    texts = {}
    if args.passwd and args.user:
        uid, _, gid = args.user.partition(":")
        gid = gid or uid
        texts["/etc/passwd"] = (f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{uid}:{gid}:nonroot:/home/nonroot:/sbin/nologin\n".encode(), 0o644)
        texts["/etc/group"] = (f"root:x:0:\nnonroot:x:{gid}:\n".encode(), 0o644)

    layer = layer_tar(files, texts)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            **({"User": args.user} if args.user else {}),
            **({"Entrypoint": args.entrypoint} if args.entrypoint else {}),
            **({"Cmd": args.cmd} if args.cmd else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/image.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [args.tag], "Layers": [layer_name]}]

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (layer_name, layer),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            if "/" in name:
                d = tarfile.TarInfo(name.split("/")[0])
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(d)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, args.out)
    print(f"image.py: {args.tag} -> {args.out} ({len(layer) // 1024} KiB layer, {len(files)} files, id sha256:{config_name[:-5]})", file=sys.stderr)


if __name__ == "__main__":
    main()
