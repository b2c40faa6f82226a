# shellcheck shell=bash
# Sourced by e2e/cluster.sh: the cgroup /taas-e2e that holds every process and pod of the
# cluster (v1 hierarchies as mounted here; a v2-only host has one), so `down` finds all of them
# and `memory` reads the whole cluster's peak.

cg_roots() {
  local m
  while read -r _ m fstype _; do
    case "$fstype" in
      cgroup) echo "$m" ;;
      cgroup2) [ "$m" = /sys/fs/cgroup ] && echo "$m" ;;
    esac
  done </proc/mounts
}

cg_create() {
  local r d
  for r in $(cg_roots); do
    for d in "$CGROUP" "$CGROUP/control-plane"; do
      [ -d "$r/$d" ] && continue
      mkdir "$r/$d"
      # cpuset cgroups start empty; a task cannot join one until cpus and mems are set.
      if [ -f "$r/$d/cpuset.cpus" ]; then
        cat "$(dirname "$r/$d")/cpuset.cpus" >"$r/$d/cpuset.cpus"
        cat "$(dirname "$r/$d")/cpuset.mems" >"$r/$d/cpuset.mems"
      fi
    done
  done
}

cg_join() { # PATH relative to each root; joins the calling shell
  local r
  for r in $(cg_roots); do
    [ -d "$r/$1" ] && echo "$BASHPID" >"$r/$1/cgroup.procs" 2>/dev/null || true
  done
}

cg_pids() { # every pid in the cluster's cgroup tree (read from the memory or first hierarchy)
  local r
  for r in $(cg_roots); do
    [ -d "$r/$CGROUP" ] || continue
    find "$r/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

cg_remove() {
  local r
  for r in $(cg_roots); do
    [ -d "$r/$CGROUP" ] || continue
    find "$r/$CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ ! -d "$r/$CGROUP" ] || log "warning: could not remove cgroup $r/$CGROUP"
  done
}

memory_cgroup() {
  local r
  for r in $(cg_roots); do
    if [ -f "$r/$CGROUP/memory.max_usage_in_bytes" ] || [ -f "$r/$CGROUP/memory.peak" ]; then
      echo "$r/$CGROUP"
      return 0
    fi
  done
  return 1
}
