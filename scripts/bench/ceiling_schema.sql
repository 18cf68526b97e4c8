DROP TABLE IF EXISTS entries, journals, payments;
CREATE TABLE payments (id bigserial PRIMARY KEY, merchant text, amount bigint CHECK (amount > 0), currency char(3),
                       status text, idem_key text UNIQUE, created_at timestamptz DEFAULT now());
CREATE TABLE journals (id bigserial PRIMARY KEY, payment_id bigint REFERENCES payments, created_at timestamptz DEFAULT now());
CREATE TABLE entries (id bigserial PRIMARY KEY, journal_id bigint REFERENCES journals, account text, debit bigint, credit bigint);
