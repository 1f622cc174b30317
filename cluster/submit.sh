#!/usr/bin/env bash
# Submit an rlhf-ray command to a Ray cluster as a Ray job, with this repository as its code.
# A thin wrapper of `ray job submit`: it fixes the working dir and runtime env (so the upload
# leaves out .venv/ and runs/) and sends the cluster's auth token the way Ray 2.60 reads it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: cluster/submit.sh [--address URL] [--token TOKEN | --token-file FILE] [--no-wait]
                         [--submission-id ID] -- COMMAND...

Submits COMMAND (e.g. rlhf-ray run --config configs/llama2_7b_lora_8x3090.yaml
model.path=/data/Llama-2-7b-hf) as a Ray job, uploading this repository as its working dir
with cluster/runtime_env.yaml.

  --address URL        the head's dashboard / job API (default: $RAY_ADDRESS, else
                       http://127.0.0.1:8265)
  --token TOKEN        the cluster's auth token (`ray get-auth-token` on the head). Visible to
                       other users in `ps`: prefer --token-file or $RAY_AUTH_TOKEN.
  --token-file FILE    a file holding the token (default: ~/.ray/auth_token if it exists)
  --no-wait            return once submitted instead of streaming the logs
  --submission-id ID   the job's id (default: rlhf-<date>-<time>-<random>)
  -h, --help           this text

With a token (any of the above, or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH) it sets
RAY_AUTH_MODE=token: Ray's job CLI sends the token only in that mode.
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

address=${RAY_ADDRESS:-http://127.0.0.1:8265}
submission_id="rlhf-$(date +%Y%m%d-%H%M%S)-$RANDOM"
wait_flag=()  # bash 3.2 (macOS) treats an empty array as unset under set -u
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --address) (($# >= 2)) || die "--address needs a URL"; address=$2; shift 2 ;;
    --token) (($# >= 2)) || die "--token needs a value"; export RAY_AUTH_TOKEN=$2; shift 2 ;;
    --token-file)
      (($# >= 2)) || die "--token-file needs a path"
      [[ -s $2 ]] || die "token file $2 is missing or empty"
      RAY_AUTH_TOKEN_PATH=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
      export RAY_AUTH_TOKEN_PATH; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --submission-id) (($# >= 2)) || die "--submission-id needs a value"; submission_id=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (run with --help; the command to run goes after --)" ;;
  esac
done
(($#)) || die "no command to run: put it after --, e.g. cluster/submit.sh -- rlhf-ray train --config configs/tiny_cpu.yaml"

# Ray reads the token from $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
# An explicit RAY_AUTH_MODE (e.g. disabled) wins.
if [[ -z ${RAY_AUTH_MODE:-} && ( -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} || -s $HOME/.ray/auth_token ) ]]; then
  export RAY_AUTH_MODE=token
fi

# The upload is the repository, whatever directory this is called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ray=ray
if ! command -v ray >/dev/null; then
  [[ -x .venv/bin/ray ]] || die "no 'ray' on PATH and no .venv/bin/ray: run 'make venv' or activate a venv with ray==2.60.0"
  ray=.venv/bin/ray
fi

# Printed first: with the default wait, `ray job submit` streams the logs until the job ends.
auth_note=""
[[ ${RAY_AUTH_MODE:-} == token ]] && auth_note=" (with RAY_AUTH_MODE=token and the same token)"
cat <<EOF
submitting job $submission_id to $address
  dashboard:    $address   (Jobs tab; Prometheus metrics on each node's --metrics-export-port)
  follow logs:  ray job logs -f --address $address $submission_id
  status:       ray job status --address $address $submission_id
  stop:         ray job stop --address $address $submission_id
  ray commands need the same address$auth_note
EOF

exec "$ray" job submit --address "$address" --submission-id "$submission_id" \
  --working-dir . --runtime-env cluster/runtime_env.yaml ${wait_flag[@]+"${wait_flag[@]}"} -- "$@"
