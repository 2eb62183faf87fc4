"""PII scrubbing: personal data becomes a typed placeholder so the model learns the shape, not the value.

    type    placeholder   what is matched
    email   <EMAIL>       e-mail addresses
    iban    <IBAN>        IBANs, compact or in groups of four, mod-97 checksum valid
    card    <TARJETA>     payment cards: 13-19 digits, in one run or in groups of four split by spaces or
                          dashes (Amex 4-6-5), issuer digit 2-6, Luhn valid
    ip      <IP>          IPv4 and IPv6 addresses (validated with the standard library's ipaddress)
    dni     <DNI>         Spanish DNI: 8 digits + control letter, the letter validated
    nie     <NIE>         Spanish NIE: X/Y/Z + 7 digits + control letter, the letter validated
    phone   <TELEFONO>    Spanish numbers (9 digits starting 6-9, optional +34/0034) and international
                          numbers of Spain and Latin America (+52 Mexico, +54 Argentina, +57 Colombia,
                          +56 Chile, +51 Peru, ...), plus "(55) 1234-5678" area-code style

Numbers with a wrong checksum are left alone: they are not personal data (and usually not data at all).
Years, verse references ("Juan 3:16"), dates, prices and thousands-grouped quantities ("900.000.000") are
not matched. Types are scrubbed in the order above, so an IBAN is never half-eaten by the phone pattern.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from llm.corpus.document import Document

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "iban": "<IBAN>",
    "card": "<TARJETA>",
    "ip": "<IP>",
    "dni": "<DNI>",
    "nie": "<NIE>",
    "phone": "<TELEFONO>",
}

_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_letter_valid(digits: str, letter: str) -> bool:
    """The DNI control letter is the number modulo 23 looked up in a fixed table."""
    return _DNI_LETTERS[int(digits) % 23] == letter.upper()


def nie_letter_valid(prefix: str, digits: str, letter: str) -> bool:
    """A NIE is validated like a DNI whose leading X, Y, Z stands for 0, 1, 2."""
    return dni_letter_valid(str("XYZ".index(prefix.upper())) + digits, letter)


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    compact = iban.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not compact.isalnum():
        return False
    return int("".join(str(int(char, 36)) for char in compact[4:] + compact[:4])) % 97 == 1


def luhn_valid(digits: str) -> bool:
    """The Luhn check digit of payment card numbers: double every second digit from the right."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _only_digits(text: str) -> str:
    return "".join(char for char in text if char.isdigit())


_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?!\w)")
# Cards are written as one run of digits or in groups of four (American Express: 4-6-5). Not after a
# decimal point or comma, so the digits of 0.651416873060081 are never a card.
_CARD = re.compile(
    r"(?<![\w.,-])(?:[2-6][0-9]{12,18}|[2-6][0-9]{3}(?:([ -])[0-9]{4}(?:\1[0-9]{4})?)\1[0-9]{4}\1[0-9]{1,4}"
    r"|3[47][0-9]{2}([ -])[0-9]{6}\2[0-9]{5})(?![\w]|[.,-][0-9])"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?![\w]|\.[0-9])"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# An uppercase control letter may follow after a space or dash; a lower-case one only when attached, so
# "12345678 y ..." (a number and the word "y") is never taken for a DNI.
_DNI = re.compile(r"(?<![\w.])([0-9]{2}\.?[0-9]{3}\.?[0-9]{3})(?:[ -]?([A-Z])|([a-z]))(?!\w)")
_NIE = re.compile(r"(?<!\w)([XYZ])-?([0-9]{7})[ -]?([A-Z])(?!\w)")
# Country codes of Spain and the Spanish-speaking Americas (longest first so +593 is not read as +59...).
_COUNTRY_CODES = sorted(
    [
        "34",
        "52",
        "54",
        "57",
        "56",
        "51",
        "58",
        "593",
        "591",
        "595",
        "598",
        "53",
        "502",
        "503",
        "504",
        "505",
        "506",
        "507",
        "240",
        "1",
    ],
    key=len,
    reverse=True,
)
# The national number never starts with 0 once the country code is written (so "0010 0010" is not one).
_INTERNATIONAL_PHONE = re.compile(
    r"(?<![\w+])(?:\+|\b00)(?:" + "|".join(_COUNTRY_CODES) + r")[ .-]?(?:\([1-9][0-9]{0,3}\)[ .-]?)?"
    r"[1-9](?:[ .-]?[0-9]){6,11}(?![\w]|[.,-][0-9])"
)
_SPANISH_PHONE = re.compile(r"(?<![\w+.,-])(?<![0-9][ .-])[6-9](?:[ .-]?[0-9]){8}(?![\w]|[.,-][0-9])")
_AREA_CODE_PHONE = re.compile(r"(?<![\w)])\([0-9]{2,4}\) ?[0-9]{3,4}[ -][0-9]{4}(?![\w]|-[0-9])")
# A quantity, not a phone: 9 digits in thousands groups "912.345.678", or followed by a currency or unit.
_THOUSANDS = re.compile(r"[0-9]{3}\.[0-9]{3}\.[0-9]{3}")
_AMOUNT_AFTER = re.compile(r"\s*(?:€|\$|%|euros?\b|pesos?\b|d[oó]lares\b|habitantes\b)", re.IGNORECASE)


def _valid_ipv4(match: re.Match[str]) -> bool:
    """Rejects what only looks like an address: versions and section numbers with one-digit parts
    ("LibreOffice 7.4.1.2", "6.2.4.1. Configuración") and numbered headings ("12.6.2.1. Compilando")."""
    if all(len(part) == 1 for part in match.group().split(".")):
        return False
    line_start = match.start() == 0 or match.string[match.start() - 1] == "\n"
    return not (line_start and match.string.startswith(". ", match.end()))


def _valid_ipv6(match: re.Match[str]) -> bool:
    """A real IPv6 address with at least two groups: "::1" alone or ASCII art like "`::88" are left."""
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return sum(1 for group in match.group().split(":") if group) >= 2


def _valid_card(match: re.Match[str]) -> bool:
    return luhn_valid(_only_digits(match.group()))


def _valid_dni(match: re.Match[str]) -> bool:
    return dni_letter_valid(match.group(1).replace(".", ""), match.group(2) or match.group(3))


def _valid_nie(match: re.Match[str]) -> bool:
    return nie_letter_valid(*match.groups())


def _valid_spanish_phone(match: re.Match[str]) -> bool:
    return not _THOUSANDS.fullmatch(match.group()) and not _AMOUNT_AFTER.match(match.string, match.end())


def _always(match: re.Match[str]) -> bool:
    return True


# Cheap scans that every match of a type needs; most prose has none, and then the detectors are skipped.
_AT_SIGN = re.compile("@")
_SEVEN_DIGITS = re.compile(r"[0-9](?:[ .-]?[0-9]){6}")  # In every IBAN, card, DNI, NIE and phone number.
_IP_LIKE = re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]|:[0-9A-Fa-f]{0,4}:")

# Per type, in scrubbing order: a gate, then (pattern, validator) pairs. A match the validator rejects stays.
_DETECTORS: dict[str, tuple[re.Pattern[str], list[tuple[re.Pattern[str], Callable[[re.Match[str]], bool]]]]] = {
    "email": (_AT_SIGN, [(_EMAIL, _always)]),
    "iban": (_SEVEN_DIGITS, [(_IBAN, lambda match: iban_valid(match.group()))]),
    "card": (_SEVEN_DIGITS, [(_CARD, _valid_card)]),
    "ip": (_IP_LIKE, [(_IPV4, _valid_ipv4), (_IPV6, _valid_ipv6)]),
    "dni": (_SEVEN_DIGITS, [(_DNI, _valid_dni)]),
    "nie": (_SEVEN_DIGITS, [(_NIE, _valid_nie)]),
    "phone": (
        _SEVEN_DIGITS,
        [(_INTERNATIONAL_PHONE, _always), (_SPANISH_PHONE, _valid_spanish_phone), (_AREA_CODE_PHONE, _always)],
    ),
}


def _replace_valid(
    text: str, pattern: re.Pattern[str], valid: Callable[[re.Match[str]], bool], placeholder: str
) -> tuple[str, int]:
    """Replace the matches of `pattern` that pass `valid`; returns (text, number replaced)."""
    replaced = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal replaced
        if not valid(match):
            return match.group()
        replaced += 1
        return placeholder

    return pattern.sub(replace, text), replaced


def scrub_pii(text: str, types: Iterable[str] = PLACEHOLDERS) -> tuple[str, dict[str, int]]:
    """Replace the PII of the given types with placeholders; returns (text, replacements per type)."""
    wanted = set(types)
    unknown = wanted - PLACEHOLDERS.keys()
    if unknown:
        raise ValueError(f"unknown PII types {sorted(unknown)}; known: {list(PLACEHOLDERS)}")
    counts = {}
    for pii_type, (gate, detectors) in _DETECTORS.items():
        if pii_type not in wanted:
            continue
        counts[pii_type] = 0
        if gate.search(text):
            for pattern, valid in detectors:
                text, replaced = _replace_valid(text, pattern, valid, PLACEHOLDERS[pii_type])
                counts[pii_type] += replaced
    return text, counts


def pii_stage(doc: Document, *, types: frozenset[str]) -> Document:
    """Document stage: scrubs PII in place and records the counts per type in metadata["pii"]."""
    text, counts = scrub_pii(doc.text, types)
    return doc.replace(text=text, metadata={**doc.metadata, "pii": counts})
