-- Step 2 of the bundled example: a few rows.
insert into customers (id, name, city) values
    (1, 'Ada', 'London'),
    (2, 'Grace', 'New York'),
    (3, 'Edsger', 'Nuenen');
insert into orders (id, customer_id, amount) values
    (1, 1, 12.50), (2, 1, 7.25), (3, 2, 99.00), (4, 3, 3.10);
