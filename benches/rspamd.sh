# Sourced by the benchmark scripts: starts Debian's rspamd under DIR with
# one worker enabled (the others off), DNS from the given nameserver, its
# log and pid file under DIR/run. The worker's own settings (bind_socket,
# count, milter mode ...) are the third argument, as rspamd config lines.
#   start_rspamd DIR NAMESERVER WORKER WORKER-SETTINGS
start_rspamd() {
  local dir=$1 dns=$2 worker=$3 settings=$4 o=$1/local/override.d w
  mkdir -p $o $dir/run
  printf '%s\n' "$settings" >$o/worker-$worker.inc
  for w in controller normal proxy fuzzy; do
    [ $w = $worker ] || echo 'enabled = false;' >$o/worker-$w.inc
  done
  printf 'pidfile = "%s/run/rspamd.pid";\ndns {\n  nameserver = ["%s"];\n  timeout = 0.5s;\n  retransmits = 1;\n}\n' $dir $dns >$o/options.inc
  printf 'type = "file";\nfilename = "%s/run/rspamd.log";\nlevel = "notice";\n' $dir >$o/logging.inc
  chown -R _rspamd $dir/run
  rspamd -u _rspamd -g _rspamd -c /etc/rspamd/rspamd.conf --var=LOCAL_CONFDIR=$dir/local \
    --var=DBDIR=$dir/run --var=RUNDIR=$dir/run --var=LOGDIR=$dir/run >/dev/null 2>&1
  for w in $(seq 100); do sleep 0.2; [ -s $dir/run/rspamd.pid ] && break; done
}
