"""Image curation: listing (`source`), fetching with retries (`fetch`), decoding and checks (`decode`),
rules and dedup (`filters`), the contact sheet (`contact_sheet`) and the whole pipeline (`pipeline`).
"""
