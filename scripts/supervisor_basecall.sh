#!/usr/bin/env bash
# bc_script for the `script` runner: basecall one batch through a running
# dorado_basecall_server with ont_basecaller_supervisor (how the original pipeline ran).
#
#   supervisor_basecall.sh INPUT_DIR OUTPUT_DIR CONFIG PORT
#
# CONFIG  the server's basecall configuration (e.g. dna_r10.4.1_e8.2_400bps_5khz_hac.cfg);
# PORT    the server's port: an IPC socket path, or a TCP port number with SUPERVISOR_USE_TCP=1.
# The server must already run (started by the site, one per GPU); the `dorado-server`
# runner starts and supervises it itself instead.
# Environment: SUPERVISOR (executable, default "ont_basecaller_supervisor"),
# SUPERVISOR_NUM_CLIENTS (default 4), SUPERVISOR_USE_TCP (1 = --use_tcp),
# SUPERVISOR_EXTRA_ARGS (extra words, split on spaces).
set -euo pipefail

if [[ $# -ne 4 ]]; then
    echo "usage: $0 INPUT_DIR OUTPUT_DIR CONFIG PORT" >&2
    exit 64
fi
input_dir=$1 output_dir=$2 config=$3 port=$4
if [[ ! -d $input_dir ]]; then
    echo "$0: INPUT_DIR $input_dir is not a directory" >&2
    exit 66
fi
args=(--input_path "$input_dir" --save_path "$output_dir" --config "$config"
      --port "$port" --num_clients "${SUPERVISOR_NUM_CLIENTS:-4}")
if [[ ${SUPERVISOR_USE_TCP:-0} == 1 ]]; then
    args+=(--use_tcp)
fi
if [[ -n ${SUPERVISOR_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<< "$SUPERVISOR_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
exec "${SUPERVISOR:-ont_basecaller_supervisor}" "${args[@]}"
