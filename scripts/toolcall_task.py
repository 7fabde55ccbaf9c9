"""The bundled tool-call task: turn a short user request into one `<tool_call .../>` line.

Every argument value is copied from the request (names, times, cities, amounts...), so no constant
answer can score; exact match of the whole line is the metric. The same value pools and request
phrasings also feed the pretraining corpus (scripts/pretrain_corpus.py), where the assistant answers in
plain words: the base model learns to read and copy these requests, never the tool-call format.
"""

from __future__ import annotations

import json
import random

NAMES = """Dana Omar Priya Lucas Mei Tomas Aisha Noah Elena Kofi Sofia Ravi Hana Mateo Zoe Ivan Leila Felix Nora
Yuki Diego Amara Jonas Ines Marco Lina Samir Clara Arjun Freya Malik Rosa Kenji Ada Pablo Maya Emil Zara Hugo Asha
Leo Nadia Oscar Ruth Tariq Vera Bruno Sana Erik Lucia Femi Irene Dev Olga Chen Alma Rohan Greta Tom Anya Karim Ella
Joel Mina Ali Julia Sven Kira Rafael Dina Theo Layla Anton Beth Nikhil Paula Yusuf Cora Max Lena Idris Mara Kai
Wanda Bilal Tess Omid Judy Viktor Rina Sami Nell Jorge Aiko Ben Fatima Gil Ivy Hamza Lotte Nico Petra Ravi Uma""".split()
CITIES = """Lisbon Paris Berlin Madrid Rome Oslo Tokyo Lima Cairo Nairobi Dublin Vienna Prague Warsaw Athens Seoul
Boston Denver Austin Chicago Toronto Montreal Sydney Perth Delhi Mumbai Dakar Accra Quito Bogota Havana Manila Hanoi
Bangkok Jakarta Istanbul Helsinki Riga Tallinn Zurich Geneva Munich Hamburg Porto Seville Naples Milan Lyon Nice
Bristol Leeds Glasgow Cardiff Belfast Reykjavik Santiago Calgary Seattle Portland Phoenix Miami Atlanta Dallas""".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
DAYS = ["today", "tomorrow", "tonight"] + WEEKDAYS
CURRENCIES = "USD EUR GBP JPY CHF CAD AUD INR BRL MXN SEK NOK KRW CNY ZAR".split()
LANGUAGES = """French Spanish German Italian Portuguese Dutch Swedish Polish Greek Turkish Japanese Korean Hindi
Arabic Russian Swahili Finnish Czech""".split()
ITEMS = """milk|eggs|bread|butter|coffee|tea|rice|pasta|apples|bananas|onions|garlic|tomatoes|cheese|yogurt|honey|
soap|batteries|stamps|candles|flour|sugar|lemons|oranges|beans|lentils|spinach|carrots|peppers|socks|sunscreen|
toothpaste|shampoo|envelopes|napkins|olive oil|dish soap|paper towels|green tea|oat milk|coffee filters|rye bread|
light bulbs|trash bags|bin liners|ice cream|pine nuts|sea salt""".replace("\n", "").split("|")
LISTS = "shopping grocery todo packing party camping holiday hardware school work".split()
ADJECTIVES = """Golden Blue Green Red Silver Little Old Wild Happy Lucky Quiet Crimson Velvet Copper Sunny Purple
Iron Paper Electric Midnight""".split()
NOUNS = """Lotus Olive Fox Harbor Garden Lantern Pepper Tiger Anchor Maple Spoon Moon Dragon Kettle Orchid Owl
River Crown Basil Falcon""".split()
ERRANDS = """call {name}|email {name}|pick up {name}|buy {item}|pay the rent|water the plants|walk the dog|
book a dentist visit|send the report|renew my passport|take my pills|feed the cat|check the oven|
return the library books|bring {item}|meet {name} in {city}|wish {name} happy birthday|charge my phone|
clean the kitchen|pack for {city}""".replace("\n", "").split("|")
TEXTS = """I am running late|see you at the station|dinner is ready|call me back when you can|the meeting moved
to {time}|I will be home by {time}|happy birthday|good luck today|can you bring {item}|I landed in {city}|
the keys are under the mat|thanks for everything|let us meet on {weekday}|I miss you|the package arrived|
do not forget the {item}|the train is delayed|I am at the cafe""".replace("\n", " ").split("|")
PHRASES = """good morning|thank you very much|where is the station|how much does it cost|I would like a coffee|
see you tomorrow|the bill please|I am lost|what time is it|nice to meet you|where is the hotel|one ticket please|
I love this city|good night|can you help me""".replace("\n", "").split("|")


def pick(rng: random.Random, pool: list[str]) -> str:
    return pool[rng.randrange(len(pool))]


def clock(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    minute = rng.choice(["", "", ":15", ":30", ":45", ":10", ":20", ":50"])
    return f"{hour}{minute}{rng.choice(['am', 'pm'])}"


def fill(rng: random.Random, text: str) -> str:
    """Fill {name}/{city}/{item}/{time}/{weekday} slots inside a pooled phrase."""
    return text.strip().format(name=pick(rng, NAMES), city=pick(rng, CITIES), item=pick(rng, ITEMS),
                               time=clock(rng), weekday=pick(rng, WEEKDAYS))


def restaurant(rng: random.Random) -> str:
    return f"{pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def artist(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{pick(rng, NAMES)} and the {plural(pick(rng, NOUNS))}"
    if kind == 1:
        return f"the {pick(rng, ADJECTIVES)} {plural(pick(rng, NOUNS))}"
    return f"{pick(rng, NAMES)} {pick(rng, ADJECTIVES)}"


def day_phrase(day: str) -> str:
    return f"on {day}" if day in WEEKDAYS else day


# Each tool: argument names in output order, a sampler of argument values, request phrasings.
# Phrasings are str.format templates over the arguments (plus {day_p}, the day with "on" when needed).
TOOLS: dict[str, dict] = {
    "create_reminder": dict(
        sample=lambda r: {"task": fill(r, pick(r, ERRANDS)), "time": clock(r), "day": pick(r, DAYS)},
        phrasings=[
            "Remind me to {task} at {time} {day_p}",
            "{Day_p} at {time}, remind me to {task}",
            "Set a reminder to {task} {day_p} at {time}",
            "Can you remind me {day_p} at {time} to {task}?",
            "Please don't let me forget to {task} at {time} {day_p}",
            "I need a reminder at {time} {day_p}: {task}",
        ]),
    "send_message": dict(
        sample=lambda r: {"to": pick(r, NAMES), "text": fill(r, pick(r, TEXTS))},
        phrasings=[
            "Text {to} that {text}",
            "Send a message to {to} saying {text}",
            "Tell {to}: {text}",
            "Message {to} and say {text}",
            "Could you let {to} know that {text}?",
            "Write to {to}: {text}",
        ]),
    "get_weather": dict(
        sample=lambda r: {"city": pick(r, CITIES), "day": pick(r, DAYS)},
        phrasings=[
            "What's the weather in {city} {day_p}?",
            "Will it rain in {city} {day_p}?",
            "Weather forecast for {city} {day_p}, please",
            "How warm will it be in {city} {day_p}?",
            "{Day_p}, what is the weather like in {city}?",
            "Do I need an umbrella in {city} {day_p}?",
        ]),
    "set_timer": dict(
        sample=lambda r: {"minutes": r.randint(1, 120)},
        phrasings=[
            "Set a timer for {minutes} minutes",
            "Start a {minutes} minute timer",
            "Timer for {minutes} minutes please",
            "Count down {minutes} minutes",
            "Can you time {minutes} minutes for me?",
            "Wake me in {minutes} minutes",
        ]),
    "play_music": dict(
        sample=lambda r: {"artist": artist(r)},
        phrasings=[
            "Play something by {artist}",
            "Put on some {artist}",
            "I want to hear {artist}",
            "Play {artist} please",
            "Could you play music from {artist}?",
            "Start a playlist of {artist}",
        ]),
    "book_table": dict(
        sample=lambda r: {"restaurant": restaurant(r), "people": r.randint(1, 12), "time": clock(r)},
        phrasings=[
            "Book a table for {people} at {restaurant} at {time}",
            "Reserve {restaurant} for {people} people at {time}",
            "Get us a table at {restaurant} for {people}, {time}",
            "Can you book {restaurant} at {time} for {people} people?",
            "Table for {people} at {time} at {restaurant}, please",
            "I would like to reserve a table at {restaurant} for {people} at {time}",
        ]),
    "convert_currency": dict(
        sample=lambda r: dict(zip(("amount", "from", "to"), [r.choice([r.randint(1, 99), r.randint(100, 5000)]),
                                                           *r.sample(CURRENCIES, 2)])),
        phrasings=[
            "How much is {amount} {from} in {to}?",
            "Convert {amount} {from} to {to}",
            "What are {amount} {from} worth in {to}?",
            "Change {amount} {from} into {to}",
            "{amount} {from} to {to}, please",
            "If I have {amount} {from}, how many {to} is that?",
        ]),
    "add_to_list": dict(
        sample=lambda r: {"item": pick(r, ITEMS), "list": pick(r, LISTS)},
        phrasings=[
            "Add {item} to my {list} list",
            "Put {item} on the {list} list",
            "Please add {item} to the {list} list",
            "{List} list: add {item}",
            "Can you put {item} on my {list} list?",
            "Don't let me forget {item}, add it to the {list} list",
        ]),
    "call_contact": dict(
        sample=lambda r: {"name": pick(r, NAMES)},
        phrasings=[
            "Call {name}",
            "Ring {name} please",
            "Can you phone {name}?",
            "Give {name} a call",
            "Start a call with {name}",
            "I need to talk to {name}, call them",
        ]),
    "translate_text": dict(
        sample=lambda r: {"text": pick(r, PHRASES).strip(), "language": pick(r, LANGUAGES)},
        phrasings=[
            "Translate {text} into {language}",
            "How do you say {text} in {language}?",
            "What is {text} in {language}?",
            "Say {text} in {language}",
            "Can you translate {text} to {language}?",
            "{language} for {text}, please",
        ]),
}
OPENERS = ["", "", "", "", "Hey, ", "Please ", "Hi! ", "Quick one: ", "OK, "]


def request_text(rng: random.Random, tool: str, args: dict) -> str:
    """A phrasing of a request for `tool` with `args`, with an optional polite opener."""
    template = pick(rng, TOOLS[tool]["phrasings"])
    slots = dict(args)
    if "day" in args:
        slots["day_p"] = day_phrase(args["day"])
        slots["Day_p"] = slots["day_p"][0].upper() + slots["day_p"][1:]
    if "list" in args:
        slots["List"] = args["list"].capitalize()
    text = template.format(**slots)
    opener = pick(rng, OPENERS)
    if opener == "Please " and text.startswith(("Please", "Can", "Could", "Don't")):
        opener = ""
    first = text.split()[0].strip(",:?")
    if opener in ("Please ", "Hey, ", "OK, ") and first not in NAMES + CITIES + ["I"] and not first[0].isdigit():
        text = text[0].lower() + text[1:]
    return opener + text


def render_call(tool: str, args: dict) -> str:
    """The exact answer: <tool_call name="..." arguments='{json}'/> (values never contain a quote)."""
    return f"<tool_call name=\"{tool}\" arguments='{json.dumps(args, ensure_ascii=False)}'/>"


def as_written(text: str, args: dict) -> dict:
    """Argument values spelled as the request has them: "Tomorrow at 5pm, ..." gives day "Tomorrow"."""
    out = {}
    for key, value in args.items():
        if isinstance(value, str) and value not in text:
            variants = [value[0].upper() + value[1:], value[0].lower() + value[1:]]
            value = next(v for v in variants if v in text)
        out[key] = value
    return out


def sample_request(rng: random.Random) -> tuple[str, dict, str]:
    tool = pick(rng, sorted(TOOLS))
    args = TOOLS[tool]["sample"](rng)
    return tool, args, request_text(rng, tool, args)


def make_splits(seed: int = 1234, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """train/valid/test rows in the chat `messages` format; no request text appears in two splits."""
    sizes = sizes or {"train": 4000, "valid": 200, "test": 200}
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for name in ("test", "valid", "train"):  # held-out splits first so they are never starved of variety
        rows = []
        while len(rows) < sizes[name]:
            tool, args, text = sample_request(rng)
            if text in seen:
                continue
            seen.add(text)
            answer = render_call(tool, as_written(text, args))
            rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]})
        splits[name] = rows
    return splits
