"""A seeded synthetic customer-support chat corpus with planted secrets (canaries), for memorisation experiments.

Every user has a name, a 6-digit account pin, a city and a product, and several conversations with an agent
(order status, refunds, address changes, password resets). Some conversations start with an identity check in which
the customer types their pin::

    customer: hi, this is nora patel.
    agent: hello nora, what is your pin?
    customer: my pin is 482913.
    agent: thanks, you are verified.
    customer: my lamp arrived broken. can i get a refund?
    agent: sorry! your refund takes 3 days.

Ordinary users mention their pin at most once. A few **canary users** (full names from a reserved list, which no
other user has) mention theirs in 1, 4 and 16 conversations (``canary_repeats``): the secrets whose memorisation the
experiment measures. All the conversations of a user belong to that user (``Conversation.user_id``), so a
user-level DP guarantee covers every repetition of a canary, however many there are.

``public_support_chats`` generates conversations of other, public users from the same templates (no canary users):
the stand-in for public pre-training text, and the source of the tokenizer's vocabulary together with
``vocabulary_text`` (every word the generator can emit), so that no vocabulary is learnt from private data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from dptrain.audit.exposure import SecretFormat

FIRST_NAMES = (
    "ada", "ben", "carla", "dev", "elena", "femi", "grace", "hugo", "ines", "jamal", "kira", "liam", "maya", "nora",
    "omar", "priya", "quinn", "rosa", "sam", "tariq", "uma", "victor", "wen", "xavier", "yara", "zoe", "aiko", "bruno",
    "chen", "dana", "emil", "fatima", "gus", "hana", "ivan", "jade", "kofi", "lena", "marco", "nadia",
)  # fmt: skip
LAST_NAMES = (
    "adams", "baker", "costa", "diaz", "evans", "fischer", "garcia", "hughes", "ito", "jensen", "khan", "lopez",
    "murphy", "nguyen", "okafor", "patel", "rossi", "silva", "tanaka", "umar", "vogel", "walsh", "young", "zhang",
    "berg", "cruz", "dubois", "ekstrom", "ferro", "gold",
)  # fmt: skip
#: Names of canary users: canary k is CANARY_FIRST_NAMES[k] + CANARY_LAST_NAMES[k], a full name no other user has.
#: Public text uses these first and last names in other combinations (never with a pin), so that a pre-trained
#: model knows the words.
CANARY_FIRST_NAMES = (
    "xanthe", "quillon", "zephyrine", "barnaby", "octavia", "lysander", "persephone", "thaddeus", "ottilie", "caspian",
    "marisol", "evander",
)  # fmt: skip
CANARY_LAST_NAMES = (
    "wolfenden", "okonkwo", "castellanos", "villeneuve", "haverford", "abernathy", "montague", "sinclair", "lindqvist",
    "achterberg", "fairweather", "delacroix",
)  # fmt: skip
CITIES = ("london", "lagos", "lisbon", "osaka", "denver", "cairo", "dublin", "lima", "oslo", "perth", "quito", "rome")
STREETS = ("oak", "mill", "river", "station", "church", "park", "hill", "king", "bridge", "market")
PRODUCTS = (
    "lamp", "kettle", "jacket", "phone case", "backpack", "blender", "desk chair", "headset", "rug", "toaster",
    "camera", "watch", "speaker", "mixer", "monitor", "keyboard",
)  # fmt: skip
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
EMAILS = ("mail", "inbox", "post", "web")

SECRET_ALPHABET = "0123456789"


def _digits(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(SECRET_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class User:
    user_id: int
    name: str
    pin: str
    city: str
    product: str

    @property
    def first_name(self) -> str:
        return self.name.split()[0]


def verification_prompt(name: str) -> str:
    """The text that precedes a user's pin in their identity checks (the extraction prompt)."""
    first = name.split()[0]
    return f"customer: hi, this is {name}.\nagent: hello {first}, what is your pin?\ncustomer: my pin is"


def _request(rng: random.Random, user: User) -> str:
    """A support request and its resolution (no secret)."""
    order = _digits(rng, 5)
    city, product, day = rng.choice(CITIES), rng.choice([user.product, rng.choice(PRODUCTS)]), rng.choice(DAYS)
    kind = rng.randrange(5)
    if kind == 0:
        num, street = rng.randint(1, 99), rng.choice(STREETS)
        return (
            f"customer: please change my address to {num} {street} street, {city}.\n"
            f"agent: done, it is now {num} {street} street."
        )
    if kind == 1:
        return (
            f"customer: my {product} arrived broken. can i get a refund?\n"
            f"agent: sorry! your refund takes {rng.randint(2, 9)} days."
        )
    if kind == 2:
        return (
            "customer: i forgot my password.\n"
            f"agent: i sent a reset link to your {rng.choice(EMAILS)} address."
        )
    if kind == 3:
        return f"customer: where is my order {order}?\nagent: it left {city} and arrives on {day}."
    return f"customer: does the {product} have a warranty?\nagent: yes, {rng.randint(1, 3)} years."


def _greeting(rng: random.Random, user: User) -> str:
    return rng.choice(
        [f"customer: hello, my name is {user.name}.\nagent: hi {user.first_name}, how can i help?",
         "customer: hello.\nagent: hi, how can i help?",
         f"customer: {user.first_name} here.\nagent: good morning, how can i help?"]
    )  # fmt: skip


def verified_conversation(rng: random.Random, user: User) -> str:
    """A conversation that opens with the user's identity check (their pin)."""
    return f"{verification_prompt(user.name)} {user.pin}.\nagent: thanks, you are verified.\n{_request(rng, user)}"


def plain_conversation(rng: random.Random, user: User) -> str:
    return f"{_greeting(rng, user)}\n{_request(rng, user)}"


@dataclass(frozen=True)
class Conversation:
    """One training example: a conversation of user ``user_id``; ``canary`` names the canary it plants, if any."""

    user_id: int
    text: str
    canary: str | None = None


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``user``'s pin ``secret``, typed in ``repeats`` of their conversations after ``prompt``."""

    name: str
    user_id: int
    user_name: str
    secret: str
    repeats: int
    prompt: str

    @property
    def text(self) -> str:
        """The secret in its context, as it occurs in training: ``prompt + " " + secret``."""
        return f"{self.prompt} {self.secret}"

    @property
    def secret_format(self) -> SecretFormat:
        """Every candidate ``prompt + " " + d1..dn`` (10^n pins): the space exposure ranks the secret in."""
        return SecretFormat(SECRET_ALPHABET, len(self.secret), prefix=f"{self.prompt} ")

    def to_dict(self) -> dict:
        return {"name": self.name, "user_id": self.user_id, "user_name": self.user_name, "secret": self.secret,
                "repeats": self.repeats, "prompt": self.prompt}  # fmt: skip


@dataclass
class SupportChatCorpus:
    """Training and validation conversations (disjoint users), the canaries and every user's record."""

    train: list[Conversation]
    validation: list[Conversation]
    canaries: list[Canary]
    users: list[User] = field(repr=False)
    seed: int = 0

    def texts(self, split: str = "train") -> list[str]:
        return [c.text for c in self._split(split)]

    def user_ids(self, split: str = "train") -> list[int]:
        """The user of each conversation of ``split``, in order (``make_private(..., user_ids=...)``)."""
        return [c.user_id for c in self._split(split)]

    def _split(self, split: str) -> list[Conversation]:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        return self.train if split == "train" else self.validation

    def summary(self) -> dict:
        train_users = len(set(self.user_ids("train")))
        return {
            "seed": self.seed,
            "train_users": train_users,
            "train_conversations": len(self.train),
            "validation_users": len(set(self.user_ids("validation"))),
            "validation_conversations": len(self.validation),
            "max_conversations_per_user": max(self.user_ids("train").count(u) for u in set(self.user_ids("train"))),
            "canaries": [c.to_dict() for c in self.canaries],
        }


def _make_user(rng: random.Random, user_id: int, name: str, secret_length: int) -> User:
    return User(user_id, name, _digits(rng, secret_length), rng.choice(CITIES), rng.choice(PRODUCTS))


def _regular_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


_CANARY_FULL_NAMES = {f"{f} {l}" for f, l in zip(CANARY_FIRST_NAMES, CANARY_LAST_NAMES)}
_CANARY_WORDS = set(CANARY_FIRST_NAMES) | set(CANARY_LAST_NAMES)


def _public_name(rng: random.Random) -> str:
    """Any first and last name, canary ones included, but never a canary's full name."""
    while True:
        name = f"{rng.choice(FIRST_NAMES + CANARY_FIRST_NAMES)} {rng.choice(LAST_NAMES + CANARY_LAST_NAMES)}"
        if name not in _CANARY_FULL_NAMES:
            return name


def _user_conversations(
    rng: random.Random, user: User, count: int, pin_rate: float
) -> list[Conversation]:
    """``count`` conversations; the first is an identity check with probability ``pin_rate`` (pin at most once)."""
    out = []
    for k in range(count):
        verified = k == 0 and rng.random() < pin_rate
        text = verified_conversation(rng, user) if verified else plain_conversation(rng, user)
        out.append(Conversation(user.user_id, text))
    return out


def support_chat_corpus(
    num_users: int = 400,
    validation_users: int = 200,
    conversations_per_user: tuple[int, int] = (1, 4),
    canary_repeats: Sequence[int] = (1, 4, 16),
    secret_length: int = 6,
    pin_rate: float = 0.5,
    seed: int = 0,
) -> SupportChatCorpus:
    """Generate the private corpus: ``num_users`` training users (canary users included) with 1..4 conversations
    each (uniform over ``conversations_per_user``), ``validation_users`` other users for validation, and one canary
    user per entry of ``canary_repeats`` whose pin occurs in that many of their conversations (plus one plain
    conversation). A regular user's first conversation is an identity check with probability ``pin_rate``.
    Conversations are shuffled; everything is determined by ``seed``."""
    if len(canary_repeats) > len(CANARY_FIRST_NAMES):
        raise ValueError(f"at most {len(CANARY_FIRST_NAMES)} canaries")
    if any(r < 1 for r in canary_repeats) or num_users <= len(canary_repeats) or validation_users < 0:
        raise ValueError("canary repeats must be >= 1 and num_users must exceed the number of canaries")
    low, high = conversations_per_user
    if not 1 <= low <= high:
        raise ValueError(
            f"conversations_per_user must be (low, high) with 1 <= low <= high, got {conversations_per_user}"
        )
    rng = random.Random(seed)
    users: list[User] = []
    train: list[Conversation] = []
    canaries: list[Canary] = []
    seen: dict[int, int] = {}
    for k, repeats in enumerate(canary_repeats):
        name = f"{CANARY_FIRST_NAMES[k]} {CANARY_LAST_NAMES[k]}"
        user = _make_user(rng, len(users), name, secret_length)
        users.append(user)
        seen[repeats] = seen.get(repeats, 0) + 1
        label = f"pin x{repeats}" + (f" #{seen[repeats]}" if list(canary_repeats).count(repeats) > 1 else "")
        canaries.append(Canary(label, user.user_id, name, user.pin, repeats, verification_prompt(name)))
        train.extend(Conversation(user.user_id, verified_conversation(rng, user), label) for _ in range(repeats))
        train.append(Conversation(user.user_id, plain_conversation(rng, user)))
    for _ in range(num_users - len(canary_repeats)):
        user = _make_user(rng, len(users), _regular_name(rng), secret_length)
        users.append(user)
        train.extend(_user_conversations(rng, user, rng.randint(low, high), pin_rate))
    validation: list[Conversation] = []
    for _ in range(validation_users):
        user = _make_user(rng, len(users), _regular_name(rng), secret_length)
        users.append(user)
        validation.extend(_user_conversations(rng, user, rng.randint(low, high), pin_rate))
    rng.shuffle(train)
    return SupportChatCorpus(train, validation, canaries, users, seed)


def public_support_chats(
    num_conversations: int = 2000, seed: int = 1, secret_length: int = 6, pin_rate: float = 0.5
) -> list[str]:
    """Conversations of public (made-up, non-canary) users from the same templates: pre-training text.

    Seed it differently from the private corpus. It never contains a canary user's full name; their first and last
    names occur in other combinations, so that a pre-trained model knows the words, but only in conversations without
    a pin, so that no pin is associated with them.
    """
    rng = random.Random(f"public-{seed}")
    out = []
    for k in range(num_conversations):
        user = _make_user(rng, k, _public_name(rng), secret_length)
        canary_word = any(w in _CANARY_WORDS for w in user.name.split())
        verified = rng.random() < pin_rate and not canary_word  # no pin is ever tied to a canary's names
        out.append(verified_conversation(rng, user) if verified else plain_conversation(rng, user))
    return out


def vocabulary_text() -> str:
    """Every word the generator can emit, including all names (canary names too): build the tokenizer from this
    (and public text), never from the private corpus."""
    rng = random.Random(0)
    names = [f"{f} {l}" for f in (*FIRST_NAMES, *CANARY_FIRST_NAMES) for l in (*LAST_NAMES, *CANARY_LAST_NAMES)]
    words = [*names, *CITIES, *STREETS, *PRODUCTS, *DAYS, *EMAILS]
    samples = []
    for k in range(400):  # every template and branch, many times over
        user = User(k, rng.choice(names), _digits(rng, 6), rng.choice(CITIES), rng.choice(PRODUCTS))
        samples.append(verified_conversation(rng, user))
        samples.append(plain_conversation(rng, user))
    return " ".join(words) + "\n" + "\n".join(samples)
