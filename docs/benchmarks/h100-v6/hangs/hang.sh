#!/usr/bin/env bash
# hang.sh SECONDS OUTPREFIX cmd...: runs cmd; if it is still alive after SECONDS, dumps native stacks (gdb) and kills it.
s=$1; o=$2; shift 2
"$@" & pid=$!
for ((i = 0; i < s; i++)); do kill -0 $pid 2>/dev/null || { wait $pid; exit $?; }; sleep 1; done
{ which gdb py-spy; py-spy dump --native --pid $pid; gdb -p $pid -batch -ex "thread apply all bt 25"; } > $o.stacks 2>&1
kill -ABRT $pid; sleep 3; kill -9 $pid 2>/dev/null; exit 99
