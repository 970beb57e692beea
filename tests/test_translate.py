"""The Messages -> chat translation and back (translate.py, translate_stream.py): examples, then hypothesis
round trips: any valid Messages request -> chat request -> a backend's answer (whole or streamed) -> Messages
answer keeps text, images, tool names, ids and arguments, and stop reasons."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice import errors
from sluice.api_anthropic import estimate_tokens
from sluice.translate import stop_reason, to_chat, to_message, tool_input
from sluice.translate_stream import MessagesStream, message_events

USER = [{"role": "user", "content": "hi"}]


def test_minimal_request_and_sampling_fields():
    assert to_chat({"max_tokens": 5, "messages": USER, "metadata": {"user_id": "u"}, "thinking": {"type": "adaptive"},
                    "temperature": 0.2, "top_p": 0.5, "top_k": 3, "stop_sequences": []}, "m") == \
        {"model": "m", "max_tokens": 5, "messages": USER, "temperature": 0.2, "top_p": 0.5, "top_k": 3}
    streamed = to_chat({"max_tokens": 5, "messages": USER, "stream": True}, "m")
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}


def test_system_blocks_and_mid_conversation_system_join_the_first_message():
    chat = to_chat({"max_tokens": 5, "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "c"}]}, "m")
    assert chat["messages"] == [{"role": "system", "content": "a\n\nb\n\nc"}, {"role": "user", "content": "q"}]


def test_tool_choice_forms():
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {"max_tokens": 5, "messages": USER, "tools": tools}
    assert to_chat({**body, "tool_choice": {"type": "any"}}, "m")["tool_choice"] == "required"
    one = to_chat({**body, "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True}}, "m")
    assert one == {**to_chat(body, "m"), "tool_choice": {"type": "function", "function": {"name": "f"}},
                   "parallel_tool_calls": False}
    assert "tool_choice" not in to_chat({"max_tokens": 5, "messages": USER, "tool_choice": {"type": "auto"}}, "m")


def test_tool_result_with_error_flag_and_image():
    img = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    chat = to_chat({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "is_error": True,
         "content": [{"type": "text", "text": "boom"}, img]}]}]}, "m")
    assert chat["messages"] == [{"role": "tool", "tool_call_id": "t", "content": "Error: boom"},
                                {"role": "user", "content": [{"type": "image_url",
                                                              "image_url": {"url": "https://x/y.png"}}]}]


@pytest.mark.parametrize("body,param", [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "top_k": 1.5}, "top_k"),
    ({"max_tokens": 5, "messages": USER, "tool_choice": {"type": "maybe"}}, "tool_choice"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "x", "name": "f", "input": "no"}]}]}, "messages[0].content[0].input"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"max_tokens": 5, "system": [{"type": "image"}], "messages": USER}, "system"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(errors.BadRequest) as e:
        to_chat(body, "m")
    assert e.value.param == param


def test_stop_reasons_and_tool_input():
    assert stop_reason("stop", {"stop_reason": "END"}, ["END"], False) == ("stop_sequence", "END")
    assert stop_reason("stop", {}, ["END"], False) == ("end_turn", None)
    assert stop_reason("length", {}, None, True) == ("max_tokens", None)
    assert stop_reason("content_filter", {}, None, False) == ("refusal", None)
    assert tool_input('{"a": 1}') == {"a": 1} and tool_input("") == {} and tool_input("[1]") == {"_raw": "[1]"}


def test_estimate_tokens():
    assert estimate_tokens({"messages": [{"role": "user", "content": "abcd" * 10}]}) == 10
    assert estimate_tokens({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}, {"type": "tool_use", "name": "f", "input": {}}]}]}) == 1 + 1600


def test_message_events_rebuild_the_message():
    msg = {"id": "m", "type": "message", "role": "assistant", "model": "x", "stop_reason": "tool_use",
           "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 2},
           "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"k": 1}}]}
    assert rebuild(list(message_events(msg))) == {k: msg[k] for k in ("content", "stop_reason", "model")}


# ---- round trips (hypothesis) -------------------------------------------------------------------------------
text = st.text(min_size=1, max_size=12)
name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
json_value = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)
tool_args = st.dictionaries(text, json_value, max_size=3)
ids = st.from_regex(r"toolu_[a-z0-9]{1,8}", fullmatch=True)
image = st.sampled_from([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0"}},
                         {"type": "image", "source": {"type": "url", "url": "https://example.com/i.png"}}])
text_block = text.map(lambda t: {"type": "text", "text": t})
tool_use = st.builds(lambda i, n, a: {"type": "tool_use", "id": i, "name": n, "input": a}, ids, name, tool_args)
tool_result = st.builds(lambda i, t: {"type": "tool_result", "tool_use_id": i, "content": t}, ids, text)
user_turn = text | st.lists(text_block | image | tool_result, min_size=1, max_size=4)
assistant_turn = text | st.lists(text_block | tool_use, min_size=1, max_size=3)
tools = st.lists(st.builds(lambda n, d: {"name": n, "description": d, "input_schema": {"type": "object"}}, name, text),
                 max_size=3, unique_by=lambda t: t["name"])


@st.composite
def requests(draw):
    turns = draw(st.lists(st.tuples(user_turn, assistant_turn), min_size=1, max_size=3))
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    if draw(st.booleans()):
        msgs.append({"role": "user", "content": draw(user_turn)})
    body = {"max_tokens": draw(st.integers(1, 10 ** 5)), "messages": msgs, "tools": draw(tools),
            "stop_sequences": draw(st.lists(text, max_size=2)), "metadata": {"user_id": "u"}}
    system = draw(st.none() | text | st.lists(text_block, min_size=1, max_size=2))
    if system is not None:
        body["system"] = system
    return body


def blocks(content):
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def pieces(chat_content) -> list[dict]:
    return [{"type": "text", "text": chat_content}] if isinstance(chat_content, str) else chat_content or []


@settings(max_examples=200, deadline=None)
@given(requests())
def test_any_request_keeps_its_text_images_tools_and_order(body):
    chat = to_chat(body, "up")
    sent = chat["messages"]
    system = body.get("system")
    if system:
        joined = system if isinstance(system, str) else "\n\n".join(b["text"] for b in system)
        assert sent[0] == {"role": "system", "content": joined}
        sent = sent[1:]
    want_user, want_calls, want_results, want_assistant = [], [], [], []
    for m in body["messages"]:
        for b in blocks(m["content"]):
            if m["role"] == "assistant":
                if b["type"] == "tool_use":
                    want_calls.append((b["id"], b["name"], b["input"]))
            elif b["type"] == "tool_result":
                want_results.append((b["tool_use_id"], b["content"]))
            else:
                want_user.append(b)
        if m["role"] == "assistant":
            want_assistant.append("".join(b["text"] for b in blocks(m["content"]) if b["type"] == "text"))
    got_user = [p for m in sent if m["role"] == "user" for p in pieces(m["content"])]
    assert [p.get("text") or p["image_url"]["url"] for p in got_user] == \
        [b.get("text") or (b["source"].get("url") or f"data:image/png;base64,{b['source']['data']}") for b in want_user]
    calls = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
             for m in sent if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert calls == want_calls
    assert [(m["tool_call_id"], m["content"]) for m in sent if m["role"] == "tool"] == want_results
    assert [m["content"] or "" for m in sent if m["role"] == "assistant"] == want_assistant
    assert [t["function"]["name"] for t in chat.get("tools", [])] == [t["name"] for t in body["tools"]]
    assert chat.get("stop", []) == body["stop_sequences"] and chat["max_tokens"] == body["max_tokens"]


calls_st = st.lists(st.tuples(ids, name, tool_args), max_size=3, unique_by=lambda c: c[0])
finish_st = st.sampled_from(["stop", "length", "tool_calls", None])


def chat_answer(content, calls, finish):
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                                 for i, n, a in calls]
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


def expected_reason(calls, finish):
    if finish == "length":
        return "max_tokens"
    return "tool_use" if calls or finish == "tool_calls" else "end_turn"


@settings(max_examples=200, deadline=None)
@given(st.none() | text, calls_st, finish_st, st.lists(text, max_size=2), st.data())
def test_any_answer_keeps_text_tool_calls_and_stop_reason(content, calls, finish, stops, data):
    answer = chat_answer(content, calls, finish)
    matched = data.draw(st.sampled_from(stops)) if stops and finish == "stop" and not calls else None
    if matched is not None:                         # vLLM says which stop sequence ended it
        answer["choices"][0]["stop_reason"] = matched
        msg = to_message(answer, "fast", stops)
        assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", matched)
        return
    msg = to_message(answer, "fast", stops)
    assert msg["model"] == "fast" and msg["type"] == "message" and msg["usage"] == {"input_tokens": 3,
                                                                                    "output_tokens": 4}
    texts = [b["text"] for b in msg["content"] if b["type"] == "text"]
    assert "".join(texts) == (content or "")
    assert [(b["id"], b["name"], b["input"]) for b in msg["content"] if b["type"] == "tool_use"] == calls
    assert msg["stop_reason"] == expected_reason(calls, finish)


def rebuild(events: list[dict]) -> dict:
    """A client's view of a Messages stream: the message its events build."""
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    content, open_index, reason, model = [], None, None, events[0]["message"]["model"]
    for ev in events[1:-1]:
        kind = ev["type"]
        if kind == "content_block_start":
            assert open_index is None and ev["index"] == len(content)
            content.append(dict(ev["content_block"], _json=""))
            open_index = ev["index"]
        elif kind == "content_block_delta":
            assert ev["index"] == open_index
            d, block = ev["delta"], content[open_index]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            else:
                block["_json"] += d["partial_json"]
        elif kind == "content_block_stop":
            assert ev["index"] == open_index
            open_index = None
        else:
            assert kind == "message_delta" and open_index is None
            reason = ev["delta"]["stop_reason"]
    for b in content:
        js = b.pop("_json")
        if b["type"] == "tool_use":
            b["input"] = json.loads(js) if js else {}
    return {"content": content, "stop_reason": reason, "model": model}


def parse_sse(data: bytes) -> list[dict]:
    out = []
    for event in data.decode().split("\n\n"):
        if event:
            name_line, data_line = event.split("\n")
            ev = json.loads(data_line[len("data: "):])
            assert name_line == "event: " + ev["type"]
            out.append(ev)
    return out


@settings(max_examples=200, deadline=None)
@given(st.none() | text, calls_st, finish_st, st.data())
def test_any_streamed_answer_builds_the_same_message(content, calls, finish, data):
    """The same answer streamed in arbitrary pieces (text split anywhere, arguments split anywhere) makes the
    message to_message makes of it whole."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    if content:
        cuts = sorted(data.draw(st.lists(st.integers(1, len(content)), max_size=3)))
        for a, b in zip([0] + cuts, cuts + [len(content)]):
            if a < b:
                chunks.append({"choices": [{"index": 0, "delta": {"content": content[a:b]}, "finish_reason": None}]})
    for k, (i, n, a) in enumerate(calls):
        args = json.dumps(a)
        cut = data.draw(st.integers(0, len(args)))
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": k, "id": i, "type": "function", "function": {"name": n, "arguments": args[:cut]}}]}}]})
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": k, "function": {"arguments": args[cut:]}}]}}]})
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    ms = MessagesStream("fast")
    events = parse_sse(b"".join(ms.feed(c) for c in chunks) + ms.end())
    whole = to_message(chat_answer(content, calls, finish), "fast")
    built = rebuild(events)
    assert built["content"] == [b for b in whole["content"] if b != {"type": "text", "text": ""}]
    assert built["stop_reason"] == whole["stop_reason"] and built["model"] == "fast"
    assert events[-2]["usage"] == {"input_tokens": 3, "output_tokens": 4}
