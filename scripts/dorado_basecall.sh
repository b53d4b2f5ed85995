#!/usr/bin/env bash
# bc_script for the `script` runner: basecall one batch with dorado (1.x; 2.x has the same
# `basecaller` command line).
#
#   dorado_basecall.sh INPUT_DIR OUTPUT_DIR MODEL PORT
#
# INPUT_DIR  the job's dir of POD5 symlinks; OUTPUT_DIR the job's output dir (pass/ inside);
# MODEL      a model complex (hac, sup@v5.2.0), a model name, or a model directory;
# PORT       unused by dorado (the seed's fourth argument).
# Environment: DORADO (executable, default "dorado"), DORADO_MODELS_DIRECTORY (no downloads
# at run time when set), DORADO_EMIT ("fastq" or "bam", default fastq), DORADO_DEVICE
# (default cuda:0: CUDA_VISIBLE_DEVICES already names this engine's GPU), DORADO_EXTRA_ARGS
# (extra words, split on spaces).
# Exit code: dorado's. dorado exits 0 even when it skipped an unreadable file; the engine's
# output check compares read ids afterwards, whatever runner ran.
set -euo pipefail

if [[ $# -ne 4 ]]; then
    echo "usage: $0 INPUT_DIR OUTPUT_DIR MODEL PORT" >&2
    exit 64
fi
input_dir=$1 output_dir=$2 model=$3
dorado=${DORADO:-dorado}
if [[ ! -d $input_dir ]]; then
    echo "$0: INPUT_DIR $input_dir is not a directory" >&2
    exit 66
fi

args=(basecaller "$model" "$input_dir" --device "${DORADO_DEVICE:-cuda:0}"
      --output-dir "$output_dir/pass")
case ${DORADO_EMIT:-fastq} in
    fastq) args+=(--emit-fastq) ;;
    bam) ;;
    *) echo "$0: DORADO_EMIT must be fastq or bam, got ${DORADO_EMIT}" >&2; exit 78 ;;
esac
if [[ -n ${DORADO_MODELS_DIRECTORY:-} ]]; then
    args+=(--models-directory "$DORADO_MODELS_DIRECTORY")
fi
if [[ -n ${DORADO_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<< "$DORADO_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
mkdir -p "$output_dir/pass"
exec "$dorado" "${args[@]}"
