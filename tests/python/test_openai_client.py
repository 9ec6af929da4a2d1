"""The official openai package against a running llmdoctor server.

Environment: LLMDOCTOR_URL (e.g. http://127.0.0.1:8080), LLMDOCTOR_DOCTOR (a loaded doctor).
Prints one line per test and ends with "N passed, N failed"; exits 1 on any failure.
"""

import os
import sys
import traceback

import openai

URL = os.environ["LLMDOCTOR_URL"]
DOCTOR = os.environ["LLMDOCTOR_DOCTOR"]
client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0, timeout=120)


def patient_id():
    models = client.models.list().data
    return next(m.id for m in models if getattr(m, "parent", None) is None)


def test_chat_non_stream():
    reply = client.chat.completions.create(
        model=patient_id(),
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        seed=1,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_with_usage():
    request = dict(
        model=patient_id(),
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=16,
        seed=4,
        temperature=0.8,
    )
    whole = client.chat.completions.create(**request)
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length")


def test_completions():
    reply = client.completions.create(model=patient_id(), prompt="The sky is", max_tokens=8, seed=2)
    assert reply.object == "text_completion"
    assert isinstance(reply.choices[0].text, str)
    assert reply.usage.completion_tokens <= 8


def test_list_models():
    models = client.models.list().data
    ids = [m.id for m in models]
    assert DOCTOR in ids, ids
    doctor = next(m for m in models if m.id == DOCTOR)
    assert doctor.parent == patient_id()


def test_doctor_through_extra_body():
    reply = client.chat.completions.create(
        model=patient_id(),
        messages=[{"role": "user", "content": "Describe a tree."}],
        max_tokens=10,
        temperature=0,
        extra_body={"doctor": {"name": DOCTOR, "beta": 1.0}, "ignore_eos": True},
    )
    steering = reply.choices[0].model_extra["steering"]
    assert steering["doctors"] == [{"name": DOCTOR, "beta": 1.0}], steering


def test_doctor_through_model():
    reply = client.chat.completions.create(
        model=DOCTOR, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].model_extra["steering"]["doctors"][0]["name"] == DOCTOR


def test_bad_request_raises():
    for kwargs in (
        dict(messages=[], max_tokens=4),
        dict(messages=[{"role": "user", "content": "x"}], n=0),
        dict(messages=[{"role": "user", "content": "x"}], extra_body={"docter": DOCTOR}),
    ):
        try:
            client.chat.completions.create(model=patient_id(), **kwargs)
        except openai.BadRequestError as err:
            assert err.status_code == 400
            assert err.body["param"] is not None, err.body
        else:
            raise AssertionError(f"no error for {kwargs}")


def test_unknown_doctor_raises_not_found():
    try:
        client.chat.completions.create(
            model=patient_id(),
            messages=[{"role": "user", "content": "x"}],
            extra_body={"doctor": "nobody"},
        )
    except openai.NotFoundError as err:
        assert DOCTOR in str(err), str(err)
    else:
        raise AssertionError("an unknown doctor must not generate")


def main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_")]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"PASS {name}")
            passed += 1
        except Exception:
            print(f"FAIL {name}")
            traceback.print_exc()
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
