"""PII scrubbing (llm/corpus/pii.py): typed placeholders, checksums validated, ordinary numbers left alone."""

import pytest

from llm.corpus import pii
from llm.corpus.document import Document


def scrub(text: str, *types: str) -> str:
    return pii.scrub_pii(text, types or pii.PLACEHOLDERS)[0]


@pytest.mark.parametrize(
    "address", ["ana.garcia@ejemplo.es", "josé.pérez+boletín@correo.com.mx", "info_2024@sub.dominio.org"]
)
def test_email(address):
    assert scrub(f"Escríbeme a {address}.") == "Escríbeme a <EMAIL>."


@pytest.mark.parametrize(
    "number",
    [
        "612 345 678",
        "612345678",
        "612-34-56-78",
        "91 234 56 78",
        "+34 612 345 678",
        "0034 612345678",
        "+34 91 234 56 78",
        "+52 55 1234 5678",
        "+52 1 55 1234 5678",
        "+54 9 11 4567-8901",
        "+57 300 123 4567",
        "+56 9 1234 5678",
        "+51 987 654 321",
        "+1 809 555 1234",
        "(55) 1234-5678",
        "(011) 4567-8901",
    ],
)
def test_spanish_and_latin_american_phones(number):
    assert scrub(f"Llama al {number} por la tarde.") == "Llama al <TELEFONO> por la tarde."


@pytest.mark.parametrize("address", ["192.168.1.10", "10.0.0.1", "2001:db8::ff00:42:8329", "fe80::1ff:fe23:4567:890a"])
def test_ip_addresses(address):
    assert scrub(f"El servidor {address} no responde.") == "El servidor <IP> no responde."


@pytest.mark.parametrize("dni", ["12345678Z", "87654321X", "12.345.678-Z", "12345678-Z", "12345678 Z"])
def test_dni_with_valid_letter(dni):
    assert scrub(f"DNI {dni}, firmado.") == "DNI <DNI>, firmado."


@pytest.mark.parametrize("nie", ["X1234567L", "Y7654321G", "Z0000001Y", "X-1234567-L"])
def test_nie_with_valid_letter(nie):
    assert scrub(f"NIE {nie}, firmado.") == "NIE <NIE>, firmado."


@pytest.mark.parametrize(
    "iban",
    [
        "ES91 2100 0418 4502 0005 1332",
        "ES9121000418450200051332",
        "GB82 WEST 1234 5698 7654 32",
        "DE89 3704 0044 0532 0130 00",
    ],
)
def test_iban_with_valid_checksum(iban):
    assert scrub(f"Cuenta {iban} a nombre de Ana.") == "Cuenta <IBAN> a nombre de Ana."


@pytest.mark.parametrize(
    "card",
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004", "3782 822463 10005"],
)
def test_card_with_valid_luhn(card):
    assert scrub(f"Pagó con la tarjeta {card} ayer.") == "Pagó con la tarjeta <TARJETA> ayer."


@pytest.mark.parametrize(
    "text",
    [
        "DNI 12345678A, firmado.",  # wrong control letter (12345678 needs Z)
        "NIE X1234567A, firmado.",  # wrong control letter (needs L)
        "Cuenta ES91 2100 0418 4502 0005 1333 a nombre de Ana.",  # mod-97 fails
        "Pagó con la tarjeta 4111 1111 1111 1112 ayer.",  # Luhn fails
        "Hora 12:30:45 y dirección MAC 00:1A:2B:3C:4D:5E.",  # not IPv6
    ],
)
def test_invalid_checksums_and_lookalikes_are_not_scrubbed(text):
    assert scrub(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "En el año 1985 nació mi hermana; en 2024 cumplió 39.",
        "Porque de tal manera amó Dios al mundo (Juan 3:16), y 1 Corintios 13:4-7.",
        "Cuesta 1.250,50 € o 19,99 euros; el piso, 250.000 euros.",
        "La población mundial superó los 900.000.000 de habitantes y el presupuesto fue de 700 000 000 €.",
        "Quedamos el 12/05/2023 a las 18:30 o el 2023-05-12.",
        "El ISBN es 978-84-376-0494-7 y pi vale 3.14159265358979.",
        "LibreOffice 7.4.1.2 y el núcleo 2.6.32.",
        "12.6.2.1. Compilando e instalando un programa",
        "devuelve 0,651416873060081 y 0.450563708411459",
        "Tenía 12345678 y ya no tiene nada.",
    ],
)
def test_ordinary_numbers_are_left_alone(text):
    assert scrub(text) == text


def test_types_can_be_turned_off_and_counts_are_per_type():
    text = "Escribe a ana@ejemplo.es o llama al 612 345 678 o al 699 111 222; DNI 12345678Z."
    scrubbed, counts = pii.scrub_pii(text, ["email", "phone"])
    assert scrubbed == "Escribe a <EMAIL> o llama al <TELEFONO> o al <TELEFONO>; DNI 12345678Z."
    assert counts == {"email": 1, "phone": 2}
    with pytest.raises(ValueError, match="unknown PII types"):
        pii.scrub_pii(text, ["passport"])


def test_checksum_helpers():
    assert pii.dni_letter_valid("12345678", "Z") and not pii.dni_letter_valid("12345678", "A")
    assert pii.nie_letter_valid("X", "1234567", "L") and not pii.nie_letter_valid("X", "1234567", "M")
    assert pii.iban_valid("ES91 2100 0418 4502 0005 1332") and not pii.iban_valid("ES00 2100 0418 4502 0005 1332")
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")


def test_pii_stage_records_counts_in_metadata():
    document = Document("d", "Mi correo es ana@ejemplo.es y mi IP 192.168.1.10.", {"source": "web"})
    result = pii.pii_stage(document, types=frozenset(pii.PLACEHOLDERS))
    assert result.text == "Mi correo es <EMAIL> y mi IP <IP>."
    assert result.metadata["source"] == "web"
    assert result.metadata["pii"] == {"email": 1, "iban": 0, "card": 0, "ip": 1, "dni": 0, "nie": 0, "phone": 0}
