#!/usr/bin/env bash
# Serve Q-Zoom with `swift deploy` (OpenAI-compatible API on the loopback interface), send one request with
# an image through the openai client, and stop the server when the script exits (also on errors).
# Reads the stage-3 checkpoint; the server's log is $OUT/deploy.log.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
MODEL_TYPE=${MODEL_TYPE:-qzoom_qwen2_5_vl}
CKPT=${CKPT:-runs/stage3/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage3_gate.sh
IMAGE=${IMAGE:-data/images/example.jpg}        # any local image
QUESTION=${QUESTION:-What is written on the sign?}
PORT=${PORT:-8000}
OUT=${OUT:-runs/deploy/qwen2_5_vl_7b}
MODEL_KWARGS=${MODEL_KWARGS:-'{}'}
WAIT_S=${WAIT_S:-900}                          # seconds allowed for loading the model
mkdir -p "$OUT"

# setsid: the server (swift's child process) gets its own process group, so one kill stops all of it
setsid swift deploy \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --model_type "$MODEL_TYPE" \
    --adapters "$CKPT" \
    --infer_backend transformers \
    --host 127.0.0.1 --port "$PORT" \
    --max_new_tokens 64 \
    --model_kwargs "$MODEL_KWARGS" \
    > "$OUT/deploy.log" 2>&1 &
SERVER=$!
trap 'kill -TERM -- -"$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

for i in $(seq "$WAIT_S"); do                    # wait until the model is loaded and the server answers
    kill -0 "$SERVER" 2>/dev/null || { tail -n 20 "$OUT/deploy.log"; echo "swift deploy exited" >&2; exit 1; }
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=5)" 2>/dev/null && break
    [ "$i" -lt "$WAIT_S" ] || { echo "swift deploy did not answer within $WAIT_S s" >&2; exit 1; }
    sleep 1
done

# one chat request with an image, through the OpenAI client (ms-swift installs it)
python3 - "$PORT" "$IMAGE" "$QUESTION" <<'PY'
import base64, mimetypes, sys
from openai import OpenAI

port, image, question = sys.argv[1:4]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=600, max_retries=0)
model = client.models.list().data[0].id
url = f"data:{mimetypes.guess_type(image)[0] or 'image/png'};base64," + base64.b64encode(open(image, "rb").read()).decode()
reply = client.chat.completions.create(model=model, max_tokens=64, temperature=0, messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}])
print(f"{model}: {reply.choices[0].message.content!r} ({reply.usage.prompt_tokens} prompt tokens)")
PY
