"""Monthly report of invoices."""

from app import pricing


def monthly_report(invoices: dict[str, list[pricing.InvoiceLine]]) -> dict[str, int]:
    report = {}
    for customer, lines in invoices.items():
        total = pricing.compute_invoice_total_with_vat(lines)
        report[customer] = total
    return report
