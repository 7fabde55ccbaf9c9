"""The generated pretraining corpus for the bundled tiny chat model.

Chats (rendered later with the chat template) and plain text, built from templates over the value pools
of the tool-call task. They teach the model to hold a conversation and to copy names and values from a
message into its answer (echoing, answering from context, filling JSON records, confirming requests in
plain words). They never show the `<tool_call .../>` format: that is what LoRA has to teach.
"""

from __future__ import annotations

import json
import random

from toolcall_task import (
    ADJECTIVES,
    CITIES,
    DAYS,
    ERRANDS,
    ITEMS,
    LANGUAGES,
    NAMES,
    NOUNS,
    PHRASES,
    WEEKDAYS,
    clock,
    day_phrase,
    fill,
    pick,
    restaurant,
    sample_request,
)

SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant. Keep answers short.",
           "You help people plan their day."]
JOBS = "teacher nurse baker pilot farmer painter doctor engineer chef writer driver singer".split()
PETS = "cat dog parrot rabbit turtle hamster goldfish".split()

# How the assistant confirms each kind of request, in plain words.
CONFIRM = {
    "create_reminder": ["Sure, I will remind you to {task} at {time} {day_p}.", "OK. Reminder: {task}, {day_p} at {time}."],
    "send_message": ["Done. I told {to}: {text}.", "OK, I will let {to} know that {text}."],
    "get_weather": ["Let me look up the weather in {city} {day_p}.", "Checking the forecast for {city} {day_p}."],
    "set_timer": ["Timer started for {minutes} minutes.", "OK, {minutes} minutes, starting now."],
    "play_music": ["Now playing {artist}.", "Sure, here is some {artist}."],
    "book_table": ["I will book a table for {people} at {restaurant} at {time}.", "OK: {restaurant}, {people} people, {time}."],
    "convert_currency": ["Let me convert {amount} {from} to {to}.", "Converting {amount} {from} into {to} now."],
    "add_to_list": ["Added {item} to your {list} list.", "OK, {item} is on the {list} list."],
    "call_contact": ["Calling {name} now.", "OK, phoning {name}."],
    "translate_text": ["Here is how to say {text} in {language}.", "I will translate {text} into {language}."],
}
SMALL_TALK = [
    (["Hello!", "Hi there", "Hey", "Good morning!"], ["Hello! How can I help you today?", "Hi! What can I do for you?"]),
    (["How are you?", "How are you doing today?"],
     ["I am fine, thank you. How can I help?", "Very well, thanks! What do you need?"]),
    (["Thank you!", "Thanks a lot", "Great, thanks"], ["You are welcome!", "Happy to help."]),
    (["What can you do?", "How can you help me?"], ["I can help you with reminders, messages, music, the weather and more.",
                                                   "I answer questions and help you plan your day."]),
    (["Bye", "Goodbye!", "See you later"], ["Goodbye! Have a nice day.", "Bye! Talk to you soon."]),
    (["Tell me a joke", "Say something funny"], ["Why did the tomato blush? Because it saw the salad dressing.",
                                                 "I would tell you a joke about time, but it is not the right moment."]),
]


def person(rng):
    return {"name": pick(rng, NAMES), "age": rng.randint(18, 90), "city": pick(rng, CITIES), "job": pick(rng, JOBS),
            "pet": pick(rng, PETS), "day": pick(rng, WEEKDAYS), "time": clock(rng), "item": pick(rng, ITEMS)}


def words(rng, n):
    pools = [NAMES, CITIES, ITEMS, WEEKDAYS, ADJECTIVES, NOUNS, LANGUAGES]
    out = []
    for _ in range(n):
        kind = rng.randrange(len(pools) + 2)
        out.append(clock(rng) if kind == len(pools) else str(rng.randint(0, 999)) if kind > len(pools)
                   else pick(rng, pools[kind]))
    return " ".join(out)


def confirm_request(rng):
    tool, args, text = sample_request(rng)
    slots = dict(args)
    if "day" in args:
        slots["day_p"] = day_phrase(args["day"])
    return [(text, pick(rng, CONFIRM[tool]).format(**slots))]


def json_record(rng):
    p = person(rng)
    schemas = [
        (("name", "age", "city"), "{name} is {age} and lives in {city}."),
        (("name", "job", "city"), "{name} works as a {job} in {city}."),
        (("name", "pet"), "{name} has a {pet}."),
        (("name", "day", "time"), "I meet {name} on {day} at {time}."),
        (("item", "day"), "Buy {item} on {day}."),
        (("name", "city", "day"), "{name} flies to {city} on {day}."),
        (("name", "note"), "{name} said: {note}"),
        (("task", "time"), "At {time} I have to {task}."),
    ]
    p["note"] = pick(rng, PHRASES).strip()
    p["task"] = fill(rng, pick(rng, ERRANDS))
    keys, sentence = pick(rng, schemas)
    record = json.dumps({k: p[k] for k in keys})
    said = sentence.format(**p)
    if rng.random() < 0.7:
        ask = pick(rng, ["Write this as JSON: {s}", "Put these details in JSON: {s}", "JSON please: {s}",
                         "Turn this into a JSON object: {s}", "{s} Give me that as JSON."])
        return [(ask.format(s=said), record)]
    ask = pick(rng, ["What does this record say? {r}", "Describe this JSON in words: {r}", "Read this: {r}"])
    return [(ask.format(r=record), said)]


def echo(rng):
    phrase = words(rng, rng.randint(2, 10)) if rng.random() < 0.7 else pick(rng, PHRASES)
    ask = pick(rng, ["Repeat after me: {p}", "Say this back to me: {p}", "Please repeat {p}", "Echo: {p}",
                     "Can you say {p}?"])
    return [(ask.format(p=phrase), phrase)]


def context_qa(rng):
    p, q = person(rng), person(rng)
    facts = f"{p['name']} lives in {p['city']} and works as a {p['job']}. {q['name']} lives in {q['city']}."
    questions = [
        ("Where does {name} live?", "{name} lives in {city}."),
        ("What is the job of {name}?", "{name} works as a {job}."),
        ("Who lives in {city}?", "{name} lives in {city}."),
    ]
    question, answer = pick(rng, questions)
    first = [(f"{facts} {question.format(**p)}", answer.format(**p))]
    if rng.random() < 0.5:
        first.append((question.format(**q).replace("What is the job of", "Where does").replace("?", " live?")
                      if "job" in question else question.format(**q), f"{q['name']} lives in {q['city']}."))
    return first


def schedule_qa(rng):
    name, time, day = pick(rng, NAMES), clock(rng), pick(rng, DAYS)
    place = restaurant(rng)
    return [(f"My lunch with {name} is at {time} {day_phrase(day)} at {place}. When is it?",
             f"Your lunch with {name} is at {time} {day_phrase(day)}."),
            (pick(rng, ["And where?", "Where is it?"]), f"At {place}.")][: rng.randint(1, 2)]


def introduce(rng):
    name, city = pick(rng, NAMES), pick(rng, CITIES)
    return [(f"My name is {name} and I live in {city}.",
             pick(rng, ["Nice to meet you, {n}! How is life in {c}?", "Hello {n}! {c} sounds lovely."]).format(n=name, c=city))]


def small_talk(rng):
    asks, answers = pick(rng, SMALL_TALK)
    return [(pick(rng, asks), pick(rng, answers))]


KINDS = [(confirm_request, 5), (json_record, 3), (echo, 6), (context_qa, 2), (schedule_qa, 1), (introduce, 1),
         (small_talk, 1)]


def conversation(rng: random.Random) -> list[dict]:
    """One chat: optional system prompt, then one to three exchanges."""
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": pick(rng, SYSTEMS)})
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
        for user, assistant in kind(rng):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def story(rng: random.Random) -> str:
    """A few plain sentences (no chat template)."""
    a, b = person(rng), person(rng)
    sentences = [
        f"{a['name']} lives in {a['city']} and works as a {a['job']}.",
        f"On {a['day']} at {a['time']}, {a['name']} met {b['name']} at the {restaurant(rng)}.",
        f"They ordered {a['item']} and {b['item']}.",
        f"{b['name']} has a {b['pet']} and wants to visit {b['city']}.",
        f"Shopping list: {', '.join(rng.sample(ITEMS, 3))}.",
        f"{a['name']} called {b['name']} {day_phrase(pick(rng, DAYS))}.",
        f"The train to {b['city']} leaves at {clock(rng)}.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(2, 5)])


def make_corpus(n: int, seed: int = 7, text_share: float = 0.15) -> list[list[dict] | str]:
    """`n` documents: chats (lists of messages) and, with probability `text_share`, plain stories."""
    rng = random.Random(seed)
    return [story(rng) if rng.random() < text_share else conversation(rng) for _ in range(n)]
