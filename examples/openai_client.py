"""Talk to failoverd over its Unix socket with the official openai SDK.

    python examples/openai_client.py [/run/failoverd/failoverd.sock] [route]

The SDK needs no change beyond an HTTP transport bound to the socket (`uds=`); the
host in base_url is ignored. failoverd holds the provider keys, so api_key is unused.
The same with curl:

    curl --unix-socket /run/failoverd/failoverd.sock http://failoverd/v1/chat/completions \\
         -H 'content-type: application/json' \\
         -d '{"model": "desk", "messages": [{"role": "user", "content": "Say hello."}]}'
"""

import importlib
import sys

import openai

# The SDK's own HTTP library: httpx for openai 1.x and 2.x, its fork httpx2 for 3.x. The
# transport must come from the same one, so ask the SDK's client class which it is (both
# may be installed side by side; which one imports says nothing).
httpx = importlib.import_module(openai.DefaultHttpxClient.__base__.__module__.split(".")[0])

socket_path = sys.argv[1] if len(sys.argv) > 1 else "/run/failoverd/failoverd.sock"
route = sys.argv[2] if len(sys.argv) > 2 else "desk"

client = openai.OpenAI(
    base_url="http://failoverd/v1",
    api_key="unused",
    max_retries=0,  # failoverd already failed over; a client retry would start again at the primary
    http_client=openai.DefaultHttpxClient(transport=httpx.HTTPTransport(uds=socket_path)),
)

raw = client.chat.completions.with_raw_response.create(
    model=route, messages=[{"role": "user", "content": "Say hello in five words."}]
)
reply = raw.parse()
print(f"{reply.model} (served by {raw.headers['x-failoverd-served-by']}, "
      f"{raw.headers['x-failoverd-attempts']} attempt(s)): {reply.choices[0].message.content}")

stream = client.chat.completions.create(
    model=route, stream=True, messages=[{"role": "user", "content": "Count to five."}]
)
for chunk in stream:  # raises openai.APIError if the upstream fails after the answer began
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
