-- Step 1 of the bundled example: a small schema.
create table customers (
    id    integer primary key,
    name  text not null,
    city  text not null
);
create table orders (
    id          integer primary key,
    customer_id integer not null references customers(id),
    amount      numeric(10, 2) not null
);
