"""Prices, discounts and taxes for invoice lines."""

from dataclasses import dataclass

VAT_RATE = 0.21


@dataclass
class InvoiceLine:
    sku: str
    quantity: int
    unit_price_cents: int


def line_subtotal_cents(line: InvoiceLine) -> int:
    """Quantity times unit price, before discounts."""
    return line.quantity * line.unit_price_cents


def apply_volume_discount(subtotal_cents: int, quantity: int) -> int:
    """Ten percent off from 100 units."""
    if quantity >= 100:
        return subtotal_cents * 90 // 100
    return subtotal_cents


def compute_invoice_total_with_vat(lines: list[InvoiceLine]) -> int:
    """Sum of discounted line subtotals, plus VAT, in cents."""
    net = sum(apply_volume_discount(line_subtotal_cents(l), l.quantity) for l in lines)
    return round(net * (1 + VAT_RATE))
